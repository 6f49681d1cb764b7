# pyre-strict
"""Checks stored bytes against the index's checksums, through one bounded scratch buffer.

A *unit* is a byte range with a recorded checksum: a whole stored tensor, or one page of a large
one (format version 2). Loading checks the units it is about to copy into the template before it
copies anything; verifying checks every stored tensor, a paged one against its whole checksum
and every page in one read (``check_whole_and_pages``).
"""

from __future__ import annotations  # memoryview[int] annotations are not subscriptable at runtime in 3.11

import math
from collections.abc import Callable, Iterable, Iterator
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple

import xxhash

from distributed_shampoo.checkpoint.errors import ChecksumMismatchError
from distributed_shampoo.checkpoint.format import check_checksum, CheckpointIndex, HeaderEntry, page_checksums, page_digest
from distributed_shampoo.checkpoint.reader import GAP_BYTES, read_at

# Units are read into a buffer of this size (small enough to stay in a core's L2 cache while it
# is hashed); a larger unit is read and hashed in segments of it.
SCRATCH_BYTES: int = 1 << 20


class Unit(NamedTuple):
    """``nbytes`` bytes at absolute file ``offset`` whose checksum must be ``expected``.

    ``name`` and ``what`` (e.g. ``" page 3"``) name it in a mismatch message. A named tuple: a
    load makes one per piece it reads.
    """

    name: str
    what: str
    offset: int
    nbytes: int
    expected: str


def whole_unit(name: str, entry: HeaderEntry, index: CheckpointIndex) -> Unit:
    """The unit of a whole stored tensor."""
    return Unit(name, "", entry.begin, entry.end - entry.begin, index.checksums[name])


def page_units(name: str, entry: HeaderEntry, index: CheckpointIndex, pages: Iterable[int]) -> list[Unit]:
    """The units of the given pages of a stored tensor that has page checksums."""
    digests = index.pages[name]
    size, page = entry.end - entry.begin, index.page_bytes
    return [
        Unit(name, f" page {k}", entry.begin + k * page, min(page, size - k * page), page_digest(digests, k))
        for k in pages
    ]


def units_for_ranges(
    name: str, entry: HeaderEntry, index: CheckpointIndex, ranges: Iterable[tuple[int, int]]
) -> list[Unit]:
    """The units that cover the byte ``ranges`` (``(offset in the tensor, length)``) of a stored
    tensor: the pages they touch where the tensor has page checksums, else the whole tensor."""
    if name not in index.pages:
        return [whole_unit(name, entry, index)]
    page = index.page_bytes
    touched: set[int] = set()
    for start, length in ranges:
        touched.update(range(start // page, (start + length - 1) // page + 1))
    return page_units(name, entry, index, sorted(touched))


Mismatch = Callable[[ChecksumMismatchError], None]


def check_units(fd: int, path: Path, units: Iterable[Unit], on_mismatch: Mismatch | None = None) -> None:
    """Reads every unit once and compares its checksum.

    Args:
        fd: The open shard file.
        path: Its path, for messages.
        units: What to check (duplicates are checked once).
        on_mismatch: Receives each mismatch; None raises the first.

    Raises:
        ChecksumMismatchError: A unit does not match (without ``on_mismatch``).
        CorruptCheckpointError, CheckpointReadError: The file cannot be read.
    """
    scratch = memoryview(bytearray(SCRATCH_BYTES))
    for start, end, batch in _spans(sorted(set(units), key=attrgetter("offset"))):
        if end - start > SCRATCH_BYTES:  # one unit larger than the buffer
            _compare(path, batch[0].name, _streamed_digest(fd, path, batch[0], scratch), batch[0].expected, batch[0].what, on_mismatch)
            continue
        read_at(fd, path, start, scratch[: end - start])
        for unit in batch:
            begin = unit.offset - start
            actual = xxhash.xxh3_64_hexdigest(scratch[begin : begin + unit.nbytes])
            if actual != unit.expected:  # thousands of units match: report only a mismatch
                _compare(path, unit.name, actual, unit.expected, unit.what, on_mismatch)


def check_whole_and_pages(
    fd: int, path: Path, name: str, entry: HeaderEntry, index: CheckpointIndex, on_mismatch: Mismatch
) -> None:
    """Checks a stored tensor that has page checksums against its whole checksum and every page
    checksum, reading its bytes once (in scratch-sized runs of whole pages)."""
    page = index.page_bytes
    segment = max(page, SCRATCH_BYTES // page * page)
    scratch = memoryview(bytearray(min(segment, entry.end - entry.begin)))
    whole = xxhash.xxh3_64()
    for start in range(0, entry.end - entry.begin, segment):
        view = scratch[: min(segment, entry.end - entry.begin - start)]
        read_at(fd, path, entry.begin + start, view)
        for k, actual in enumerate(page_checksums(view, whole, page), start=start // page):
            _compare(path, name, actual, page_digest(index.pages[name], k), f" page {k}", on_mismatch)
    _compare(path, name, whole.hexdigest(), index.checksums[name], "", on_mismatch)


def _compare(path: Path, name: str, actual: str, expected: str, what: str, on_mismatch: Mismatch | None) -> None:
    try:
        check_checksum(path, name, actual, expected, what)
    except ChecksumMismatchError as error:
        if on_mismatch is None:
            raise
        on_mismatch(error)


def _spans(units: list[Unit]) -> Iterator[tuple[int, int, list[Unit]]]:
    """Spans ``(start, end, units)`` of the file, each read in one request: consecutive units
    (sorted by offset) less than ``GAP_BYTES`` apart that fit in the scratch buffer together (a
    larger unit goes alone); reading a small gap costs less than another request."""
    batch: list[Unit] = []
    start = end = 0
    for unit in units:
        unit_end = unit.offset + unit.nbytes
        if batch and (unit.offset - end > GAP_BYTES or max(end, unit_end) - start > SCRATCH_BYTES):
            yield start, end, batch
            batch = []
        if not batch:
            start = end = unit.offset
        batch.append(unit)
        end = max(end, unit_end)
    if batch:
        yield start, end, batch


def _streamed_digest(fd: int, path: Path, unit: Unit, scratch: memoryview[int]) -> str:
    state = xxhash.xxh3_64()
    for start in range(0, unit.nbytes, SCRATCH_BYTES):
        view = scratch[: min(SCRATCH_BYTES, unit.nbytes - start)]
        read_at(fd, path, unit.offset + start, view)
        state.update(view)
    return state.hexdigest()


def box_runs(
    piece_shape: tuple[int, ...], box_start: tuple[int, ...], box_shape: tuple[int, ...], itemsize: int
) -> list[tuple[int, int]]:
    """The byte ranges ``(offset in the piece, length)`` of a row-major box of a stored piece, in
    the box's row-major order: maximal runs that are contiguous in the piece (the trailing
    dimensions the box covers fully, plus the first one it covers partially)."""
    if box_shape == piece_shape:  # the whole piece: one run
        nbytes = math.prod(piece_shape) * itemsize
        return [(0, nbytes)] if nbytes else []
    full = len(piece_shape)
    while full > 0 and box_shape[full - 1] == piece_shape[full - 1]:
        full -= 1
    run_dim = max(full - 1, 0)
    run_bytes = math.prod(box_shape[run_dim:]) * itemsize
    strides = [math.prod(piece_shape[d + 1 :]) * itemsize for d in range(len(piece_shape))]
    base = sum(s * stride for s, stride in zip(box_start, strides))
    runs = [(base, run_bytes)]
    for dim in reversed(range(run_dim)):  # extend the list of run starts dimension by dimension
        runs = [(offset + i * strides[dim], run_bytes) for i in range(box_shape[dim]) for offset, _ in runs]
    return runs if run_bytes else []
