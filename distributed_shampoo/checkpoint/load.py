# pyre-strict
"""Loading = filling a template: each tensor leaf gets exactly the region it holds.

A plain tensor gets the whole logical tensor; a ``Shard`` DTensor gets its local region assembled
from the saved pieces that overlap it. Only the overlapping byte ranges are read.
"""

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import product

import torch

from distributed_shampoo.checkpoint.errors import MissingKeyError, TemplateMismatchError
from distributed_shampoo.checkpoint.format import (
    check_checksum,
    check_header_entry,
    CheckpointIndex,
    ChunkLayout,
    DTYPE_TO_NAME,
    read_header,
)
from distributed_shampoo.checkpoint.plan import local_data, local_region, SCALAR_TYPES, StateDict
from distributed_shampoo.checkpoint.reader import open_shard, read_ranges, ReadRequest
from distributed_shampoo.checkpoint.writer import tensor_bytes
from distributed_shampoo.utils.shampoo_checkpoint_utils import decode_key, encode_key, Key

# What ``keys=`` accepts: top-level keys, or key paths (prefixes of leaf paths).
KeySelection = Iterable[Key | Sequence[Key]]


@dataclass
class _PieceRead:
    """One saved piece's overlap with one destination region."""

    piece: ChunkLayout
    box_start: tuple[int, ...]  # in the piece's coordinates
    box_shape: tuple[int, ...]
    buffer: torch.Tensor  # CPU, contiguous, box-shaped: the destination itself or a temporary
    destination: torch.Tensor | None  # where to copy ``buffer`` afterwards (None: read in place)


def fill_template(
    index: CheckpointIndex,
    template: StateDict,
    keys: KeySelection | None,
    strict: bool,
    verify: bool,
) -> None:
    """Fills ``template`` from the checkpoint; see ``load_checkpoint`` for the contract."""
    selection: list[tuple[Key, ...]] | None = _normalise_keys(keys)
    reads: list[_PieceRead] = []
    missing: list[str] = []

    def fill(node: object, path: tuple[Key, ...]) -> object:
        if isinstance(node, Mapping):
            for key in list(node):
                # pyre-ignore[16]: templates hold mutable dicts.
                node[key] = fill(node[key], path + (key,))
            return node
        if isinstance(node, (list, tuple)):
            filled = [fill(item, path + (position,)) for position, item in enumerate(node)]
            if isinstance(node, list):
                node[:] = filled
                return node
            return type(node)(filled)
        if not _selected(path, selection):
            return node
        name = encode_key(path)
        if isinstance(node, torch.Tensor):
            if name in index.tensors:
                reads.extend(_plan_tensor(index, name, node))
            elif name in index.objects:
                raise TemplateMismatchError(
                    f"{name}: the template holds a tensor but {index.directory} saved the value "
                    f"{index.objects[name]!r}"
                )
            else:
                missing.append(name)
            return node
        if isinstance(node, SCALAR_TYPES):
            if name in index.objects:
                return _convert(name, index.objects[name], node)
            if name in index.tensors:
                raise TemplateMismatchError(
                    f"{name}: the template holds {node!r} but {index.directory} saved a tensor there"
                )
            missing.append(name)
            return node
        raise TemplateMismatchError(f"{name}: cannot load into a {type(node).__name__}")

    fill(template, ())
    if missing and strict:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MissingKeyError(f"{index.directory} holds no value for {len(missing)} template keys: {shown}")
    _execute(index, reads, verify)


def template_from_index(index: CheckpointIndex, keys: KeySelection | None) -> dict[Key, object]:
    """A template holding every selected leaf: empty CPU tensors and the saved values, nested as
    saved (lists and tuples restored)."""
    selection = _normalise_keys(keys)
    root: dict[Key, object] = {}
    leaves: list[tuple[list[Key], object]] = [
        (decode_key(name), torch.empty(layout.shape, dtype=layout.dtype)) for name, layout in index.tensors.items()
    ]
    leaves += [(decode_key(name), value) for name, value in index.objects.items()]
    for path, leaf in leaves:
        if not _selected(tuple(path), selection):
            continue
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
            assert isinstance(node, dict)
        node[path[-1]] = leaf
    # Deepest first, so that every ancestor of a container is still a dict when it is reached.
    for name in sorted(index.containers, key=lambda n: -len(decode_key(n))):
        path = decode_key(name)
        if not _selected(tuple(path), selection) and not _holds_selection(tuple(path), selection):
            continue
        parent = root
        for key in path[:-1]:
            child = parent.setdefault(key, {})
            assert isinstance(child, dict)
            parent = child
        children = parent.get(path[-1], {})
        assert isinstance(children, dict)
        ordered = [children[position] for position in sorted(children)]
        kind = index.containers[name]
        parent[path[-1]] = ordered if kind == "list" else tuple(ordered) if kind == "tuple" else children
    return root


def _normalise_keys(keys: KeySelection | None) -> list[tuple[Key, ...]] | None:
    if keys is None:
        return None
    return [(key,) if isinstance(key, (str, int)) else tuple(key) for key in keys]


def _selected(path: tuple[Key, ...], selection: list[tuple[Key, ...]] | None) -> bool:
    """Whether ``path`` lies under one of the selected key paths (or nothing was selected)."""
    return selection is None or any(path[: len(prefix)] == prefix for prefix in selection)


def _holds_selection(path: tuple[Key, ...], selection: list[tuple[Key, ...]] | None) -> bool:
    """Whether a selected key path lies under ``path``."""
    return selection is not None and any(prefix[: len(path)] == path for prefix in selection)


def _convert(name: str, saved: object, template_value: object) -> object:
    """The saved value in the template's Python type (an int template gets an int)."""
    if saved is None or template_value is None or type(saved) is type(template_value):
        return saved
    if isinstance(saved, bool) or isinstance(template_value, bool):
        pass  # never turn a number into a bool or back
    elif isinstance(template_value, float) and isinstance(saved, int):
        return float(saved)
    elif isinstance(template_value, int) and isinstance(saved, float) and saved.is_integer():
        return int(saved)
    raise TemplateMismatchError(
        f"{name}: saved {type(saved).__name__} {saved!r} cannot become the template's "
        f"{type(template_value).__name__}"
    )


def _plan_tensor(index: CheckpointIndex, name: str, leaf: torch.Tensor) -> list[_PieceRead]:
    layout = index.tensors[name]
    if leaf.dtype != layout.dtype or tuple(leaf.shape) != layout.shape:
        raise TemplateMismatchError(
            f"{name}: the template has a {DTYPE_TO_NAME.get(leaf.dtype, str(leaf.dtype))} tensor of shape "
            f"{list(leaf.shape)} but {index.directory} saved {DTYPE_TO_NAME[layout.dtype]} {list(layout.shape)}"
        )
    region_offsets, region_shape = local_region(leaf)
    destination = local_data(leaf)
    reads: list[_PieceRead] = []
    if math.prod(region_shape) == 0:
        return reads  # an empty shard (uneven split) or an empty tensor: nothing to fill
    for piece in layout.stored_pieces(name):
        low = [max(p, r) for p, r in zip(piece.offsets, region_offsets)]
        high = [min(p + ps, r + rs) for p, ps, r, rs in zip(piece.offsets, piece.shape, region_offsets, region_shape)]
        box_shape = tuple(h - lo for lo, h in zip(low, high))
        if any(size <= 0 for size in box_shape):
            continue
        box_start = tuple(lo - p for lo, p in zip(low, piece.offsets))
        if box_shape == tuple(destination.shape) and destination.device.type == "cpu" and destination.is_contiguous():
            reads.append(_PieceRead(piece, box_start, box_shape, destination, None))  # read in place
            continue
        target = destination[tuple(slice(lo - r, h - r) for lo, h, r in zip(low, high, region_offsets))]
        reads.append(_PieceRead(piece, box_start, box_shape, torch.empty(box_shape, dtype=layout.dtype), target))
    return reads


def _execute(index: CheckpointIndex, reads: list[_PieceRead], verify: bool) -> None:
    by_file: dict[str, list[_PieceRead]] = {}
    for read in reads:
        by_file.setdefault(index.weight_map[read.piece.name], []).append(read)
    for file_name, file_reads in by_file.items():
        path = index.directory / file_name
        fd = open_shard(path)
        try:
            header = read_header(fd, path)
            requests: list[ReadRequest] = []
            for read in file_reads:
                entry = check_header_entry(
                    path, read.piece.name, header.get(read.piece.name), read.buffer.dtype, read.piece.shape
                )
                requests.extend(_box_requests(entry.begin, read))
            read_ranges(fd, path, requests)
        finally:
            os.close(fd)
        for read in file_reads:
            if verify and read.box_shape == read.piece.shape:  # a piece read whole can be checked
                check_checksum(path, read.piece.name, tensor_bytes(read.buffer), index.checksums[read.piece.name])
            if read.destination is not None:
                read.destination.copy_(read.buffer)


def _box_requests(piece_begin: int, read: _PieceRead) -> list[ReadRequest]:
    """Requests that fill ``read.buffer`` (row-major box) from the piece stored at ``piece_begin``.

    The box is cut into maximal runs that are contiguous in the piece: the trailing dimensions
    the box covers fully, plus the first one it covers partially.
    """
    shape, start, box = read.piece.shape, read.box_start, read.box_shape
    data = tensor_bytes(read.buffer)
    # Dimensions [full, ...) are covered fully, so a run spans dimension full - 1 and all after it.
    full = len(shape)
    while full > 0 and box[full - 1] == shape[full - 1]:
        full -= 1
    run_dim = max(full - 1, 0)
    run_bytes = math.prod(box[run_dim:]) * read.buffer.element_size()
    strides = [math.prod(shape[d + 1 :]) * read.buffer.element_size() for d in range(len(shape))]
    padding = (0,) * (len(shape) - run_dim)  # a run starts at the box's start along these dims
    return [
        ReadRequest(
            piece_begin + sum((s + i) * stride for s, i, stride in zip(start, outer + padding, strides)),
            data[run * run_bytes : (run + 1) * run_bytes],
        )
        for run, outer in enumerate(product(*(range(size) for size in box[:run_dim])))
    ]


def read_whole_tensors(index: CheckpointIndex, names: Sequence[str], verify: bool = True) -> dict[str, torch.Tensor]:
    """Reads the named logical tensors whole, as new CPU tensors (sharded ones assembled).

    Raises:
        KeyError: A name is not a tensor of the checkpoint.
        CorruptCheckpointError, ChecksumMismatchError, MissingShardFileError, IndexMismatchError:
            the files are damaged.
    """
    tensors = {name: torch.empty(index.tensors[name].shape, dtype=index.tensors[name].dtype) for name in names}
    _execute(index, [read for name, tensor in tensors.items() for read in _plan_tensor(index, name, tensor)], verify)
    return tensors
