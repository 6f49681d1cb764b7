# pyre-strict
"""Reads byte ranges of a shard file into destination buffers in few large ``preadv`` calls."""

from __future__ import annotations  # memoryview[int] annotations are not subscriptable at runtime in 3.11

import os
from dataclasses import dataclass
from pathlib import Path

from distributed_shampoo.checkpoint.errors import CorruptCheckpointError, MissingShardFileError

# Ranges closer than this are read in one call, the bytes between them into a scratch buffer:
# reading a small gap costs less than another request to the disk.
_MAX_GAP: int = 64 << 10
_IOV_MAX: int = 1024


@dataclass(frozen=True)
class ReadRequest:
    """Read ``buffer.nbytes`` bytes at absolute file ``offset`` into ``buffer``."""

    offset: int
    buffer: memoryview[int]


def open_shard(path: Path) -> int:
    """Opens a shard file for reading.

    Raises:
        MissingShardFileError: If it does not exist.
    """
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise MissingShardFileError(f"shard file {path} named by the index does not exist") from None


def read_ranges(fd: int, path: Path, requests: list[ReadRequest]) -> None:
    """Fills every request's buffer from the file.

    Requests are sorted by offset and merged into ``preadv`` calls of up to 1024 buffers whenever
    the next range starts at most 64 KiB after the previous one ends.

    Raises:
        CorruptCheckpointError: If the file ends before a requested range (truncated).
    """
    scratch = memoryview(bytearray(_MAX_GAP))
    group: list[memoryview[int]] = []
    group_start = group_end = 0
    for request in sorted(requests, key=lambda r: r.offset):
        gap = request.offset - group_end
        if group and (gap < 0 or gap > _MAX_GAP or len(group) >= _IOV_MAX - 1):
            _preadv_all(fd, path, group, group_start)
            group = []
        if not group:
            group_start = request.offset
        elif gap:
            group.append(scratch[:gap])
        group.append(request.buffer)
        group_end = request.offset + request.buffer.nbytes
    if group:
        _preadv_all(fd, path, group, group_start)


def _preadv_all(fd: int, path: Path, buffers: list[memoryview[int]], offset: int) -> None:
    views = [b for b in buffers if b.nbytes]
    while views:
        read = os.preadv(fd, views, offset)
        if read == 0:
            raise CorruptCheckpointError(f"{path}: truncated: no data at byte {offset}")
        offset += read
        while views and read >= views[0].nbytes:
            read -= views[0].nbytes
            views.pop(0)
        if views and read:
            views[0] = views[0][read:]
