# pyre-strict
"""Opens a checkpoint's files as hostile input (regular files only, never blocking on open) and
reads byte ranges into destination buffers in few large ``preadv`` calls."""

from __future__ import annotations  # memoryview[int] annotations are not subscriptable at runtime in 3.11

import os
import stat
from operator import itemgetter
from pathlib import Path
from typing import NamedTuple

from distributed_shampoo.checkpoint.errors import CheckpointError, CheckpointReadError, CorruptCheckpointError

# Ranges closer than this are read in one call, the bytes between them into a scratch buffer:
# reading a small gap costs less than another request to the disk.
GAP_BYTES: int = 64 << 10
_IOV_MAX: int = 1024


class ReadRequest(NamedTuple):
    """Read ``buffer.nbytes`` bytes at absolute file ``offset`` into ``buffer`` (a named tuple: a
    load makes one per piece it reads)."""

    offset: int
    buffer: memoryview[int]


def open_regular(path: Path, what: str, missing: type[CheckpointError]) -> int:
    """Opens ``path`` for reading if it is a regular file.

    The open does not block (``O_NONBLOCK``: opening a FIFO for reading would wait for a writer);
    a FIFO, device, socket or directory is refused before a byte is read.

    Args:
        path: The file.
        what: What it is, for messages (``"index"``, ``"shard file"``).
        missing: The error to raise if it does not exist.

    Raises:
        missing: It does not exist.
        CorruptCheckpointError: It is not a regular file.
        CheckpointReadError: It cannot be opened.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise missing(f"{what} {path} does not exist") from None
    except OSError as error:
        raise CheckpointReadError(f"{path}: cannot open the {what}: {error.strerror or error}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CorruptCheckpointError(f"{path}: the {what} is not a regular file (it is a {_kind(mode)})")
    return fd


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def read_small_file(path: Path, what: str, limit: int, missing: type[CheckpointError]) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes (checked before reading).

    Raises:
        missing, CorruptCheckpointError, CheckpointReadError: As ``open_regular``, or the file is
            larger than ``limit``.
    """
    fd = open_regular(path, what, missing)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CorruptCheckpointError(f"{path}: the {what} holds {size} bytes, more than the {limit} allowed")
        chunks: list[bytes] = []
        remaining = limit + 1  # the file may grow while it is read: never read past the limit
        while remaining > 0:
            chunk = _os_call(path, os.read, fd, min(remaining, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise CorruptCheckpointError(f"{path}: the {what} grew past the {limit} bytes allowed while it was read")
        return data
    finally:
        os.close(fd)


def _os_call(path: Path, call, *args):  # pyre-ignore[2, 3]: a pass-through for os.read / os.preadv
    try:
        return call(*args)
    except OSError as error:
        raise CheckpointReadError(f"{path}: reading failed: {error.strerror or error}") from None


class Preadv(NamedTuple):
    """One ``preadv`` call: fill ``buffers``, in order, from absolute file ``offset`` on."""

    offset: int
    buffers: list[memoryview[int]]


def coalesce(requests: list[ReadRequest]) -> list[Preadv]:
    """The ``preadv`` calls that fill every request's buffer: requests sorted by offset and merged
    into calls of up to 1024 buffers whenever the next range starts at most ``GAP_BYTES`` after
    the previous one ends (the bytes between go to a scratch buffer, allocated only if there is a
    gap: a verified load coalesces every span it checks on its own)."""
    scratch: memoryview[int] | None = None
    calls: list[Preadv] = []
    group: list[memoryview[int]] = []
    group_end = 0
    for request in sorted(requests, key=itemgetter(0)):  # by offset
        gap = request.offset - group_end
        if not group or gap < 0 or gap > GAP_BYTES or len(group) >= _IOV_MAX - 1:
            group = []
            calls.append(Preadv(request.offset, group))
        elif gap:
            scratch = scratch if scratch is not None else memoryview(bytearray(GAP_BYTES))
            group.append(scratch[:gap])
        group.append(request.buffer)
        group_end = request.offset + request.buffer.nbytes
    return calls


def read_ranges(fd: int, path: Path, requests: list[ReadRequest]) -> None:
    """Fills every request's buffer from the file, in the calls ``coalesce`` plans.

    Raises:
        CorruptCheckpointError: If the file ends before a requested range (truncated).
        CheckpointReadError: If reading fails.
    """
    read_coalesced(fd, path, coalesce(requests))


def read_coalesced(fd: int, path: Path, calls: list[Preadv]) -> None:
    """Makes the ``preadv`` calls (``coalesce``'s result), each until its buffers are full.

    Raises:
        CorruptCheckpointError, CheckpointReadError: As ``read_ranges``.
    """
    for offset, buffers in calls:
        _preadv_all(fd, path, buffers, offset)


def read_at(fd: int, path: Path, offset: int, buffer: memoryview[int]) -> None:
    """Fills ``buffer`` from absolute file ``offset`` on: one range, nothing to coalesce.

    Raises:
        CorruptCheckpointError, CheckpointReadError: As ``read_ranges``.
    """
    _preadv_all(fd, path, [buffer], offset)


def prefetch(fd: int, ranges: list[tuple[int, int]]) -> None:
    """Asks the kernel to start reading the byte ranges ``(offset, length)`` of the file now, all
    at once: scattered ranges read one after another wait for the disk once per range (ranges
    closer than 64 KiB are asked for as one)."""
    spans: list[list[int]] = []  # [start, end]
    for offset, length in sorted(ranges):
        if not length:
            continue  # posix_fadvise reads a length of 0 as "to the end of the file"
        if spans and offset - spans[-1][1] <= GAP_BYTES:
            spans[-1][1] = max(spans[-1][1], offset + length)
        else:
            spans.append([offset, offset + length])
    for start, end in spans:
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)


def _preadv_all(fd: int, path: Path, buffers: list[memoryview[int]], offset: int) -> None:
    views = [b for b in buffers if b.nbytes]
    while views:
        read = _os_call(path, os.preadv, fd, views, offset)
        if read == 0:
            raise CorruptCheckpointError(f"{path}: truncated: no data at byte {offset}")
        offset += read
        while views and read >= views[0].nbytes:
            read -= views[0].nbytes
            views.pop(0)
        if views and read:
            views[0] = views[0][read:]
