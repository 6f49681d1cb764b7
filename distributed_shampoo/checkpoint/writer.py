# pyre-strict
"""Streams tensors into a safetensors file in a few large sequential writes, hashing as it goes.

The safetensors library's ``save_file`` (0.8) costs ~20 us per tensor here (shared/notes), copies
every tensor's data into a ``bytes`` object before writing, refuses non-contiguous or shared
tensors and creates 0600 files. Shampoo state has thousands of small blocks, so we lay the file
out ourselves (the format is an 8-byte header length, a JSON header, then the raw bytes), hand
the kernel up to 1024 buffers per ``writev``, and hash the tensors whose memory we wrote from
while the file is fsynced (the disk's write-back leaves the CPU idle).
"""

from __future__ import annotations  # memoryview[int] annotations are not subscriptable at runtime in 3.11

import contextlib
import ctypes
import functools
import json
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from distributed_shampoo.checkpoint.format import checksum, checksums_of, DTYPE_TO_NAME, FileRecord

# Flush the pending buffers once they hold this many bytes (bounds the extra memory of staging
# CUDA or non-contiguous tensors), or once there are as many as one writev takes.
_FLUSH_BYTES: int = 8 << 20
_IOV_MAX: int = 1024


def shared_bytes(tensor: torch.Tensor) -> memoryview[int] | None:
    """The tensor's values as row-major little-endian bytes in the tensor's own memory (a
    contiguous, non-empty, strided CPU tensor of a stored dtype that is not a conjugate or
    negative view), else None. The view keeps the tensor alive."""
    if (
        tensor.is_cpu
        and tensor.layout == torch.strided
        and tensor.dtype in DTYPE_TO_NAME
        and tensor.is_contiguous()
        and not tensor.is_conj()
        and not tensor.is_neg()
        and tensor.numel()  # memoryview cannot cast an empty shape
    ):
        return memory_bytes(tensor)
    return None


def memory_bytes(tensor: torch.Tensor) -> memoryview[int]:
    """The tensor's memory as bytes, for a tensor the caller has checked is what ``shared_bytes``
    takes (a contiguous, non-empty, strided CPU tensor that is not a conjugate or negative view):
    a load checks each template tensor once, while planning. A save or load makes one per tensor:
    a ctypes view costs 0.6 us, numpy's 1.5 us. The view keeps the tensor alive."""
    view = _byte_array(tensor.nbytes).from_address(tensor.data_ptr())
    view.owner = tensor  # pyre-ignore[16]: ctypes instances take attributes; this one pins the memory
    return memoryview(view).cast("B")


@functools.lru_cache(maxsize=1024)
def _byte_array(nbytes: int) -> type[ctypes.Array[ctypes.c_ubyte]]:
    """The ctypes array type of ``nbytes`` bytes (made once per size: a state repeats a few)."""
    return ctypes.c_ubyte * nbytes


def tensor_bytes(tensor: torch.Tensor) -> memoryview[int]:
    """The tensor's values as row-major little-endian bytes, without a copy where
    ``shared_bytes`` gives them (a conjugate or negative view is materialised: its bytes are not
    its values)."""
    shared = shared_bytes(tensor)
    if shared is not None:
        return shared
    flat = tensor.detach()
    if flat.is_conj() or flat.is_neg():
        flat = flat.resolve_conj().resolve_neg()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.reshape(-1).view(torch.uint8).numpy())


@dataclass(frozen=True)
class WrittenFile:
    """What the index records of a file just written.

    Attributes:
        checksums: Stored name -> checksum of its bytes.
        pages: Stored name -> checksums of its pages (tensors larger than one page).
        record: The file's size and header digest.
    """

    checksums: dict[str, str]
    pages: dict[str, tuple[str, ...]]
    record: FileRecord


def write_safetensors(
    path: Path, tensors: Sequence[tuple[str, torch.Tensor]], metadata: Mapping[str, str]
) -> WrittenFile:
    """Writes ``tensors`` to a new safetensors file at ``path`` and fsyncs it:
    ``start_safetensors(...).wait_durable()``.

    Raises:
        OSError: If the file exists or writing fails (the partial file is removed).
    """
    return start_safetensors(path, tensors, metadata).wait_durable()


class SyncingFile:
    """A shard file whose bytes are written and hashed (``record``) and whose fsync may still be
    running: a save sends the record on before the disk is done, and publishes only after
    ``wait_durable``."""

    def __init__(self, path: Path, fd: int, synced: Future[None], record: WrittenFile) -> None:
        self.path = path
        self.record = record
        self._fd: int | None = fd
        self._synced = synced

    def wait_durable(self) -> WrittenFile:
        """Waits for the fsync and closes the file (a later call only repeats the outcome).

        Raises:
            OSError: The fsync failed (the file is removed).
        """
        fd, self._fd = self._fd, None
        try:
            self._synced.result()
        except BaseException:
            if fd is not None:
                os.close(fd)
                self.path.unlink(missing_ok=True)
            raise
        if fd is not None:
            os.close(fd)
        return self.record


def start_safetensors(path: Path, tensors: Sequence[tuple[str, torch.Tensor]], metadata: Mapping[str, str]) -> SyncingFile:
    """Writes ``tensors`` to a new safetensors file at ``path`` and starts its fsync on a worker
    thread (fsync releases the GIL); returns once every tensor is hashed.

    Tensors are laid out by element size, largest first, then in the given order, so every tensor
    starts aligned to its element size; the header is padded with spaces to a multiple of 8. The
    result is byte-for-byte valid for the safetensors library's reader. The tensors must not
    change until this returns.

    Args:
        path: A file that must not exist yet; created with mode 0666 minus the umask.
        tensors: ``(stored name, tensor)``; CPU or CUDA, any strides.
        metadata: The header's ``__metadata__`` (string to string).

    Returns:
        The file, with the checksums and page checksums of its tensors, its size and header
        digest; ``wait_durable()`` before publishing it.

    Raises:
        OSError: If the file exists or writing fails (the partial file is removed).
    """
    if sys.byteorder != "little":
        raise OSError("safetensors stores little-endian data; big-endian hosts are not supported")
    ordered = sorted(tensors, key=lambda item: -item[1].element_size())
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    position = 0
    for name, tensor in ordered:
        size = tensor.numel() * tensor.element_size()  # math.prod of a torch.Size costs ~10 us
        header[name] = {
            "dtype": DTYPE_TO_NAME[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [position, position + size],
        }
        position += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    checksums: dict[str, str] = {}
    pages: dict[str, tuple[str, ...]] = {}
    # Tensors written from their own memory are hashed during the fsync (the disk's write-back
    # leaves the CPU idle); a copy (CUDA, non-contiguous) is hashed before it is written and
    # freed, so staging stays bounded.
    shared: list[tuple[str, memoryview[int]]] = []

    def hash_into_records(items: Sequence[tuple[str, memoryview[int]]]) -> None:
        for name, data in items:
            checksums[name], paged = checksums_of(data)
            if paged:
                pages[name] = paged

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    synced: Future[None] | None = None
    try:
        pending: list[memoryview[int] | bytes] = [len(encoded).to_bytes(8, "little"), encoded]
        pending_bytes = 8 + len(encoded)
        for name, tensor in ordered:
            data = shared_bytes(tensor)
            if data is not None:
                shared.append((name, data))
            else:
                data = tensor_bytes(tensor)
                hash_into_records([(name, data)])
            pending.append(data)
            pending_bytes += data.nbytes
            if pending_bytes >= _FLUSH_BYTES or len(pending) >= _IOV_MAX:
                _writev_all(fd, pending)
                pending, pending_bytes = [], 0
        _writev_all(fd, pending)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distributed_shampoo-fsync")
        synced = pool.submit(os.fsync, fd)
        pool.shutdown(wait=False)  # the thread exits once the fsync returns
        hash_into_records(shared)
    except BaseException:
        if synced is not None:  # the fd may be closed only once the fsync is done with it
            with contextlib.suppress(OSError):  # the error that stopped the write is the one to raise
                synced.result()
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    # Records in the file's order, whichever tensors were hashed first.
    in_order = [name for name, _ in ordered]
    record = WrittenFile(
        {name: checksums[name] for name in in_order},
        {name: pages[name] for name in in_order if name in pages},
        FileRecord(8 + len(encoded) + position, checksum(encoded)),
    )
    return SyncingFile(path, fd, synced, record)


def _writev_all(fd: int, buffers: list[memoryview[int] | bytes]) -> None:
    """``writev`` until every byte is written (the kernel may write less than asked)."""
    views = [memoryview(b) for b in buffers if len(b)]
    while views:
        written = os.writev(fd, views)
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def write_new_file(path: Path, data: bytes) -> None:
    """Writes a new file and fsyncs it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        _writev_all(fd, [data])
        os.fsync(fd)
    finally:
        os.close(fd)
