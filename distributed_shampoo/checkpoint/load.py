# pyre-strict
"""Loading = filling a template: each tensor leaf gets exactly the region it holds.

A plain tensor gets the whole logical tensor; a ``Shard`` DTensor gets its local region assembled
from the saved pieces that overlap it. Only the overlapping byte ranges are read.

A load runs in two phases so that a failure leaves the template as it was:

1. ``LoadPlan(...)`` walks the template and plans every read; ``check()`` opens the files (kept
   open, so both phases read the same files), validates their headers against the index and the
   save, and with ``verify`` checks the checksum of every byte it will copy, through one bounded
   scratch buffer. Nothing in the template changes.
2. ``apply()`` reads the bytes into the template and assigns the non-tensor values.
"""

from __future__ import annotations  # memoryview[int] annotations are not subscriptable at runtime in 3.11

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from operator import itemgetter
from typing import NamedTuple

import torch
from torch.distributed.tensor import DTensor

from distributed_shampoo.checkpoint.errors import (
    CheckpointError,
    InvalidArgumentError,
    MissingKeyError,
    MissingShardFileError,
    TemplateMismatchError,
)
from distributed_shampoo.checkpoint.format import CheckpointIndex, DTYPE_TO_NAME, HeaderEntry, TensorLayout
from distributed_shampoo.checkpoint.integrity import box_runs, check_units, Unit, units_for_ranges, whole_unit
from distributed_shampoo.checkpoint.parse import check_header_entry, read_header
from distributed_shampoo.checkpoint.plan import (
    check_placements,
    child_prefix,
    close_name,
    key_paths,
    local_box,
    spelled_prefix,
    StateDict,
)
from distributed_shampoo.checkpoint.values import is_value, same_config_kind
from distributed_shampoo.checkpoint.reader import coalesce, open_regular, prefetch, Preadv, read_coalesced, read_ranges, ReadRequest
from distributed_shampoo.checkpoint.writer import memory_bytes, tensor_bytes
from distributed_shampoo.utils.shampoo_checkpoint_utils import decode_key, encode_key, Key

# What ``keys=`` accepts: one top-level key, or several top-level keys or key paths (prefixes of
# leaf paths).
KeySelection = Key | Iterable[Key | Sequence[Key]]

# Temporary buffers (for regions that are not contiguous in the template, or not on the CPU) are
# filled and copied in batches of at most this many bytes (a larger piece goes alone).
_TEMPORARY_BYTES: int = 64 << 20


class _PieceRead(NamedTuple):
    """One saved piece's overlap with one template tensor's region (a named tuple: one per read)."""

    name: str  # the logical tensor
    piece: str  # the stored piece's name
    piece_shape: tuple[int, ...]
    box_shape: tuple[int, ...]
    target: torch.Tensor  # the template's memory for the box (a view of its local tensor)
    runs: list[tuple[int, int]]  # the box's byte ranges (offset in the piece, length), ``box_runs``
    plain: bool  # the target is a plain template tensor read whole, checked as ``memory_bytes`` needs


def _piece_read(
    name: str, piece: str, piece_shape: tuple[int, ...], box_start: tuple[int, ...], box_shape: tuple[int, ...], target: torch.Tensor
) -> _PieceRead:
    runs = box_runs(piece_shape, box_start, box_shape, target.element_size())
    return _PieceRead(name, piece, piece_shape, box_shape, target, runs, plain=False)


class OpenFiles:
    """The shard files that hold the stored ``pieces`` a load reads, open for the whole load, with
    their headers validated (the entries of ``pieces``)."""

    def __init__(self, index: CheckpointIndex, pieces: Iterable[str]) -> None:
        self.index = index
        self.fds: dict[str, int] = {}
        self.headers: dict[str, dict[str, HeaderEntry]] = {}
        self.prefetched: set[str] = set()  # pieces whose whole bytes ``prefetch`` asked for
        self._checked: dict[str, HeaderEntry] = {}  # pieces whose entries ``entry`` checked
        by_file: dict[str, list[str]] = {}
        for piece in pieces:
            by_file.setdefault(index.weight_map[piece], []).append(piece)
        try:
            for file_name in sorted(by_file):
                path = index.directory / file_name
                self.fds[file_name] = fd = open_regular(path, "shard file", MissingShardFileError)
                # "<prefix>-<rank + 1>-of-<world>.safetensors", as the index parser checked.
                rank = int(file_name[len(index.prefix) + 1 : file_name.rindex("-of-")]) - 1
                self.headers[file_name] = read_header(fd, path, index, rank, by_file[file_name])
        except BaseException:
            self.close()
            raise

    def entry(self, stored_name: str) -> HeaderEntry:
        """The header entry of a stored piece, checked against the index.

        Raises:
            IndexMismatchError: The file lacks it or stores another dtype or shape.
        """
        checked = self._checked.get(stored_name)
        if checked is not None:
            return checked
        file_name = self.index.weight_map[stored_name]
        entry = self.headers[file_name].get(stored_name)
        dtype, shape = self.index.piece_layouts[stored_name]
        if entry is None or entry.dtype != dtype or entry.shape != shape:
            entry = check_header_entry(self.index.directory / file_name, stored_name, entry, dtype, shape)
        self._checked[stored_name] = entry
        return entry

    def prefetch(self, pieces: Iterable[str]) -> None:
        """Checks the header entries of stored ``pieces`` (``entry``) and starts the disk reading
        them whole, so that it works while the load plans its reads.

        Raises:
            IndexMismatchError: As ``entry``.
        """
        by_file: dict[str, list[tuple[int, int]]] = {}
        for piece in pieces:
            entry = self.entry(piece)
            by_file.setdefault(self.index.weight_map[piece], []).append((entry.begin, entry.end - entry.begin))
            self.prefetched.add(piece)
        for file_name, ranges in by_file.items():
            prefetch(self.fds[file_name], ranges)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def normalise_keys(keys: KeySelection | None) -> list[tuple[Key, ...]] | None:
    """``keys=`` as a list of key paths; a bare ``str`` or ``int`` is one top-level key.

    Raises:
        InvalidArgumentError: Not a key, or an iterable of keys and key paths.
    """
    if keys is None:
        return None
    if isinstance(keys, (str, int)) and not isinstance(keys, bool):
        return [(keys,)]
    if not isinstance(keys, Iterable):
        raise InvalidArgumentError(f"keys= must be a key or an iterable of keys and key paths, got {keys!r}")
    selection: list[tuple[Key, ...]] = []
    for key in keys:
        path = (key,) if isinstance(key, (str, int)) else tuple(key) if isinstance(key, Sequence) else None
        if not path or any(isinstance(k, bool) or not isinstance(k, (str, int)) for k in path):
            raise InvalidArgumentError(f"keys=: {key!r} is not a str or int key or a non-empty sequence of them")
        selection.append(path)
    return selection


def selected(path: tuple[Key, ...], selection: list[tuple[Key, ...]] | None) -> bool:
    """Whether ``path`` lies under one of the selected key paths (or nothing was selected)."""
    return selection is None or any(path[: len(prefix)] == prefix for prefix in selection)


def holds_selection(path: tuple[Key, ...], selection: list[tuple[Key, ...]] | None) -> bool:
    """Whether a selected key path lies under ``path``."""
    return selection is not None and any(prefix[: len(path)] == path for prefix in selection)


def leaf_names(template: StateDict, selection: list[tuple[Key, ...]] | None = None) -> dict[str, bool]:
    """The logical names of the (selected) leaves of ``template``: what a load may look up in the
    index (a value where a tensor was saved is an error ``LoadPlan`` reports, so it is looked up
    too), each with whether it is a plain tensor, which reads every piece of its tensor whole."""
    names: dict[str, bool] = {}
    _visit_names(template, "", names)
    if selection is None:
        return names
    return {name: plain for name, plain in names.items() if selected(tuple(decode_key(name)), selection)}


def _visit_names(node: object, prefix: str, names: dict[str, bool]) -> None:
    """``leaf_names``' walk (a module function: a nested one calling itself would form a reference
    cycle that kept ``names`` alive until the garbage collector ran)."""
    if isinstance(node, torch.Tensor) or is_value(node):
        names[close_name(prefix)] = isinstance(node, torch.Tensor) and not isinstance(node, DTensor)
    elif isinstance(node, Mapping):
        for (key, child), keys in zip(node.items(), key_paths(node)):
            if isinstance(key, (str, int)) and not isinstance(key, bool):
                _visit_names(child, spelled_prefix(prefix, key, keys), names)  # pyre-ignore[6]: str or int keys, as checked
    elif isinstance(node, (list, tuple)):
        for position, child in enumerate(node):
            _visit_names(child, child_prefix(prefix, position), names)


class LoadPlan:
    """Everything a load will do to a template, planned without changing it.

    Args:
        index: The checkpoint's index.
        template: The state dict to fill.
        keys: The selection (``normalise_keys``' result).
        strict: Template leaves the checkpoint lacks, and selected keys that match nothing, are
            errors.
        verify: ``check()`` verifies checksums.

    Raises:
        MissingKeyError, TemplateMismatchError: The template cannot receive the checkpoint.
    """

    def __init__(
        self, index: CheckpointIndex, template: StateDict, keys: list[tuple[Key, ...]] | None, strict: bool, verify: bool
    ) -> None:
        self.index = index
        self.verify = verify
        self.reads: list[_PieceRead] = []
        self.assignments: list[tuple[object, Key, object]] = []  # (container, key, new value)
        self._missing: list[str] = []
        self._destinations: list[tuple[str, torch.Tensor]] = []  # (logical name, local tensor)
        self._matched: set[tuple[Key, ...]] = set()
        self._selection = keys
        # Built by ``check()`` while the disk reads: file -> the reads straight into the template,
        # and the reads through temporary buffers (regions not contiguous CPU memory).
        self._direct: dict[str, list[Preadv]] = {}
        self._temporaries: list[tuple[_PieceRead, HeaderEntry]] = []
        self._walk(template, (), "")
        if strict:
            self._check_complete(keys)
        self._check_aliasing()
        self.files: OpenFiles | None = None

    def _walk(self, node: object, path: tuple[Key, ...], prefix: str) -> object:
        """Plans the load of ``node`` (at ``path``, whose name ``child_prefix`` built as
        ``prefix``); returns what should replace it (itself, unless a value)."""
        if isinstance(node, torch.Tensor):  # first: most leaves are tensors
            if self._selected(path):
                self._plan_leaf_tensor(close_name(prefix), node)
            return node
        if isinstance(node, Mapping):
            # A flattened mapping's keys stand for the paths they spell (``plan``'s module docstring).
            for (key, child), keys in zip(node.items(), key_paths(node)):
                if isinstance(key, bool) or not isinstance(key, (str, int)):
                    raise TemplateMismatchError(f"{list(path)}: template key {key!r} is not a str or int")
                replacement = self._walk(child, path + keys, spelled_prefix(prefix, key, keys))  # pyre-ignore[6]: checked
                if replacement is not child:
                    self.assignments.append((node, key, replacement))
            return node
        if isinstance(node, (list, tuple)):
            replacements = [
                self._walk(child, path + (position,), child_prefix(prefix, position)) for position, child in enumerate(node)
            ]
            if isinstance(node, list):
                self.assignments += [(node, p, new) for p, (new, old) in enumerate(zip(replacements, node)) if new is not old]
                return node
            changed = any(new is not old for new, old in zip(replacements, node))
            return type(node)(replacements) if changed else node
        if not self._selected(path):
            return node
        name = close_name(prefix)
        if is_value(node):
            if name in self.index.objects:
                return _convert(name, self.index.objects[name], node)
            if name in self.index.tensors:
                raise TemplateMismatchError(f"{name}: the template holds {node!r} but {self.index.directory} saved a tensor there")
            self._missing.append(name)
            return node
        raise TemplateMismatchError(f"{name}: cannot load into a {type(node).__name__}")

    def _selected(self, path: tuple[Key, ...]) -> bool:
        """Whether the leaf at ``path`` is selected; records the selected key paths it matches."""
        if self._selection is None:
            return True
        matched = [prefix for prefix in self._selection if path[: len(prefix)] == prefix]
        self._matched.update(matched)
        return bool(matched)

    def _plan_leaf_tensor(self, name: str, leaf: torch.Tensor) -> None:
        layout = self.index.tensors.get(name)
        if layout is not None:
            self._plan_tensor(name, leaf, layout)
        elif name in self.index.objects:
            raise TemplateMismatchError(
                f"{name}: the template holds a tensor but {self.index.directory} saved the value {self.index.objects[name]!r}"
            )
        else:
            self._missing.append(name)

    def _check_complete(self, keys: list[tuple[Key, ...]] | None) -> None:
        if self._missing:
            shown = ", ".join(self._missing[:5]) + (f" and {len(self._missing) - 5} more" if len(self._missing) > 5 else "")
            raise MissingKeyError(f"{self.index.directory} holds no value for {len(self._missing)} template keys: {shown}")
        unmatched = [encode_key(prefix) for prefix in keys or () if prefix not in self._matched]
        if unmatched:
            raise MissingKeyError(f"keys= selects {', '.join(unmatched[:5])} but the template holds nothing there")

    def _plan_tensor(self, name: str, leaf: torch.Tensor, layout: TensorLayout) -> None:
        if leaf.dtype != layout.dtype or leaf.shape != layout.shape:
            raise TemplateMismatchError(
                f"{name}: the template has a {DTYPE_TO_NAME.get(leaf.dtype, str(leaf.dtype))} tensor of shape "
                f"{list(leaf.shape)} but {self.index.directory} saved {DTYPE_TO_NAME[layout.dtype]} {list(layout.shape)}"
            )
        if leaf.is_meta or leaf.layout != torch.strided or leaf.is_conj() or leaf.is_neg():
            what = "on the meta device (it holds no memory)" if leaf.is_meta else "not a plain strided tensor"
            raise TemplateMismatchError(f"{name}: the template tensor is {what} and cannot be filled")
        if not isinstance(leaf, DTensor) and not layout.chunks:  # the common case: a whole tensor, read whole
            nbytes = leaf.nbytes
            if nbytes:
                self._destinations.append((name, leaf))
                self.reads.append(_PieceRead(name, name, layout.shape, layout.shape, leaf, [(0, nbytes)], plain=True))
            return
        if isinstance(leaf, DTensor):
            check_placements(name, leaf, TemplateMismatchError)
        region_offsets, region_shape, destination = local_box(name, leaf, TemplateMismatchError)
        if math.prod(region_shape) == 0:
            return  # an empty shard (uneven split) or an empty tensor: nothing to fill
        self._destinations.append((name, destination))
        for piece in layout.stored_pieces(name):
            if piece.offsets == region_offsets and piece.shape == region_shape:  # the common case: read whole
                self.reads.append(_piece_read(name, piece.name, piece.shape, (0,) * len(region_shape), region_shape, destination))
                continue
            low = [max(p, r) for p, r in zip(piece.offsets, region_offsets)]
            high = [min(p + ps, r + rs) for p, ps, r, rs in zip(piece.offsets, piece.shape, region_offsets, region_shape)]
            box_shape = tuple(h - lo for lo, h in zip(low, high))
            if any(size <= 0 for size in box_shape):
                continue
            box_start = tuple(lo - p for lo, p in zip(low, piece.offsets))
            target = destination[tuple(slice(lo - r, h - r) for lo, h, r in zip(low, high, region_offsets))]
            self.reads.append(_piece_read(name, piece.name, piece.shape, box_start, box_shape, target))

    def _check_aliasing(self) -> None:
        """Template tensors that share memory would receive two values in one place; an exact
        alias (e.g. tied weights) is allowed when the checkpoint stores the same bytes for both
        (equal checksums of whole tensors), and is then read once."""
        spans: list[tuple[int, int, str, torch.Tensor]] = []
        for name, local in self._destinations:
            start = local.data_ptr()  # the storage's address plus the offset, in bytes
            if local.is_contiguous():
                extent = local.nbytes
            else:
                extent = (1 + sum((int(size) - 1) * int(stride) for size, stride in zip(local.shape, local.stride()))) * local.element_size()
            spans.append((start, start + extent, name, local))
        spans.sort(key=itemgetter(0, 1))
        duplicates: set[str] = set()
        reach: tuple[int, str, torch.Tensor] | None = None
        for start, end, name, local in spans:
            if reach is not None and start < reach[0]:
                if not self._same_bytes(reach[1], reach[2], name, local):
                    raise TemplateMismatchError(
                        f"{name} and {reach[1]}: the template's tensors share memory, so one would overwrite "
                        "the other; give each key its own tensor"
                    )
                duplicates.add(name)
            if reach is None or end > reach[0]:
                reach = (end, name, local)
        self.reads = [read for read in self.reads if read.name not in duplicates]

    def _same_bytes(self, a: str, a_local: torch.Tensor, b: str, b_local: torch.Tensor) -> bool:
        index = self.index
        return (
            not index.tensors[a].chunks
            and index.tensors[a] == index.tensors[b]
            and index.checksums[a] == index.checksums[b]
            and a_local.data_ptr() == b_local.data_ptr()
            and a_local.shape == b_local.shape
            and a_local.stride() == b_local.stride()
        )

    def check(self, files: OpenFiles | None = None) -> None:
        """Phase 1: opens the files (or takes ``files``), validates headers, verifies checksums.

        Raises:
            CheckpointError: The files are missing, damaged, or belong to another save.
        """
        self.files = opened = files or OpenFiles(self.index, [read.piece for read in self.reads])
        try:
            entries = [opened.entry(read.piece) for read in self.reads]
            self._prefetch(opened, entries)
            units = self._plan_reads(entries)
            if self.verify:
                for file_name, file_units in units.items():
                    check_units(opened.fds[file_name], self.index.directory / file_name, file_units)
        except BaseException:
            self.close()
            raise

    def _prefetch(self, files: OpenFiles, entries: list[HeaderEntry]) -> None:
        """Starts the disk reading every byte range this load copies that ``files.prefetch`` did
        not ask for, before the first is read."""
        by_file: dict[str, list[tuple[int, int]]] = {}
        for read, entry in zip(self.reads, entries):
            if read.piece in files.prefetched:
                continue
            ranges = by_file.setdefault(self.index.weight_map[read.piece], [])
            ranges += [(entry.begin + offset, length) for offset, length in read.runs]
        for file_name, ranges in by_file.items():
            prefetch(files.fds[file_name], ranges)

    def _plan_reads(self, entries: list[HeaderEntry]) -> dict[str, list[Unit]]:
        """Plans both passes over the bytes (done in ``check()``, after the prefetch: the disk reads
        meanwhile): builds the requests ``apply()`` reads with, and returns the units ``check()``
        verifies, by file (none without ``verify``)."""
        direct: dict[str, list[ReadRequest]] = {}
        units: dict[str, list[Unit]] = {}
        index = self.index
        for read, entry in zip(self.reads, entries):
            file_name = index.weight_map[read.piece]
            target = read.target
            if not (target.is_cpu and target.is_contiguous()):
                self._temporaries.append((read, entry))
            else:  # straight into the template (a plain tensor's memory was checked while planning)
                data = memory_bytes(target) if read.plain else tensor_bytes(target)
                direct.setdefault(file_name, []).extend(_requests(read, entry, data))
            if not self.verify:
                continue
            if read.box_shape == read.piece_shape:
                units.setdefault(file_name, []).append(whole_unit(read.piece, entry, index))
            else:
                units.setdefault(file_name, []).extend(units_for_ranges(read.piece, entry, index, read.runs))
        self._direct = {file_name: coalesce(requests) for file_name, requests in direct.items()}
        return units

    def apply(self) -> None:
        """Phase 2: fills the template (``check()`` first). Closes the files.

        Raises:
            CorruptCheckpointError, CheckpointReadError: Reading failed midway (the disk failed or
                a file was truncated in place since ``check()``); the template is then partly
                filled.
        """
        files = self.files
        if files is None:
            raise CheckpointError("LoadPlan.apply() needs check() first")
        try:
            for file_name, calls in self._direct.items():
                read_coalesced(files.fds[file_name], self.index.directory / file_name, calls)
            self._apply_temporaries(files)
        finally:
            self.close()
        for container, key, value in self.assignments:
            container[key] = value  # pyre-ignore[16]: templates hold mutable dicts and lists

    def _apply_temporaries(self, files: OpenFiles) -> None:
        """Reads boxes that are not contiguous CPU memory in the template into temporary buffers
        (batches of at most ``_TEMPORARY_BYTES``), then copies them in."""
        batch: list[tuple[_PieceRead, HeaderEntry]] = []
        batch_bytes = 0
        for item in self._temporaries:
            nbytes = math.prod(item[0].box_shape) * item[0].target.element_size()
            if batch and batch_bytes + nbytes > _TEMPORARY_BYTES:
                self._copy_through_temporaries(files, batch)
                batch, batch_bytes = [], 0
            batch.append(item)
            batch_bytes += nbytes
        if batch:
            self._copy_through_temporaries(files, batch)

    def _copy_through_temporaries(self, files: OpenFiles, batch: list[tuple[_PieceRead, HeaderEntry]]) -> None:
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        by_file: dict[str, list[ReadRequest]] = {}
        for read, entry in batch:
            buffer = torch.empty(read.box_shape, dtype=read.target.dtype)
            by_file.setdefault(self.index.weight_map[read.piece], []).extend(_requests(read, entry, tensor_bytes(buffer)))
            copies.append((read.target, buffer))
        for file_name, requests in by_file.items():
            read_ranges(files.fds[file_name], self.index.directory / file_name, requests)
        for target, buffer in copies:
            target.copy_(buffer)

    def close(self) -> None:
        if self.files is not None:
            self.files.close()


def _requests(read: _PieceRead, entry: HeaderEntry, data: memoryview[int]) -> list[ReadRequest]:
    """Requests that fill ``data`` (the bytes of a contiguous, box-shaped buffer) from the piece
    stored at ``entry``."""
    if len(read.runs) == 1:  # a whole piece, or whole rows of it: the buffer is the one run
        return [ReadRequest(entry.begin + read.runs[0][0], data)]
    requests: list[ReadRequest] = []
    position = 0
    for offset, length in read.runs:
        requests.append(ReadRequest(entry.begin + offset, data[position : position + length]))
        position += length
    return requests


def _convert(name: str, saved: object, template_value: object) -> object:
    """The saved value in the template's Python type (an int template gets an int; a config of
    the template's kind, ``same_config_kind``, whatever its class)."""
    if saved is None or template_value is None or type(saved) is type(template_value) or same_config_kind(saved, template_value):
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


def selected_leaves(index: CheckpointIndex, selection: list[tuple[Key, ...]] | None, strict: bool) -> tuple[list[str], list[str]]:
    """The logical tensor names and value names that ``selection`` picks from the checkpoint.

    Raises:
        MissingKeyError: ``strict`` and a selected key path matches nothing in the checkpoint.
    """
    tensors = [name for name in index.tensors if selected(tuple(decode_key(name)), selection)]
    values = [name for name in index.objects if selected(tuple(decode_key(name)), selection)]
    if strict and selection is not None:
        paths = [tuple(decode_key(name)) for name in [*tensors, *values, *index.containers]]
        unmatched = [encode_key(p) for p in selection if not any(path[: len(p)] == p for path in paths)]
        if unmatched:
            raise MissingKeyError(f"keys= selects {', '.join(unmatched[:5])} but {index.directory} holds nothing there")
    return tensors, values


def template_from_index(index: CheckpointIndex, selection: list[tuple[Key, ...]] | None, tensors: Sequence[str]) -> dict[Key, object]:
    """A template holding the selected leaves: new CPU tensors (allocated only now: call it after
    the files' headers showed that they hold these tensors) and the saved values, nested as saved
    (lists and tuples restored)."""
    root: dict[Key, object] = {}
    leaves: list[tuple[list[Key], object]] = [
        (decode_key(name), torch.empty(index.tensors[name].shape, dtype=index.tensors[name].dtype)) for name in tensors
    ]
    leaves += [(decode_key(name), value) for name, value in index.objects.items() if selected(tuple(decode_key(name)), selection)]
    for path, leaf in leaves:
        _parent(root, path)[path[-1]] = leaf
    # Deepest first, so that every ancestor of a container is still a dict when it is reached.
    for name in sorted(index.containers, key=lambda n: -len(decode_key(n))):
        path = decode_key(name)
        if not selected(tuple(path), selection) and not holds_selection(tuple(path), selection):
            continue
        parent = _parent(root, path)
        children = parent.get(path[-1], {})
        if not isinstance(children, dict):
            raise TemplateMismatchError(f"{name}: is both a value and a container")
        ordered = [children[position] for position in sorted(children)]
        kind = index.containers[name]
        parent[path[-1]] = ordered if kind == "list" else tuple(ordered) if kind == "tuple" else children
    return root


def _parent(root: dict[Key, object], path: Sequence[Key]) -> dict[Key, object]:
    """The dict that holds ``path``'s last key, created along the way."""
    node = root
    for key in path[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):  # the index parser rejects a leaf that is also a container
            raise TemplateMismatchError(f"{encode_key(path)}: {key!r} is both a value and a container")
        node = child
    return node


def prepare(
    index: CheckpointIndex,
    template: StateDict | None,
    selection: list[tuple[Key, ...]] | None,
    strict: bool,
    verify: bool,
    leaves: Mapping[str, bool] | None = None,
) -> tuple[LoadPlan, StateDict]:
    """Plans and checks a load (phase 1, see the module docstring); ``plan.apply()`` then fills
    the returned template (``template``, or a new one holding the selection when it is None).

    The files are opened first and the pieces that plain tensors read whole are prefetched, so
    the disk reads while the template is planned.

    Args:
        selection: ``normalise_keys``' result.
        leaves: ``leaf_names(template, selection)``, if the caller has it.

    Raises:
        CheckpointError: The template does not fit, or the files are missing, damaged or belong to
            another save; nothing was changed.
    """
    if template is not None:
        leaves = leaf_names(template, selection) if leaves is None else leaves
        pieces = {name: _pieces(index, name) for name in leaves if name in index.tensors}
        files = OpenFiles(index, [piece for name_pieces in pieces.values() for piece in name_pieces])
        try:
            files.prefetch([piece for name, name_pieces in pieces.items() if leaves[name] for piece in name_pieces])
            plan = LoadPlan(index, template, selection, strict, verify)
        except BaseException:
            files.close()
            raise
        plan.check(files)
        return plan, template
    names, _ = selected_leaves(index, selection, strict)
    files = _open_holding(index, names)
    try:
        fresh = template_from_index(index, selection, names)
        plan = LoadPlan(index, fresh, selection, strict=False, verify=verify)
    except BaseException:
        files.close()
        raise
    plan.check(files)
    return plan, fresh


def _pieces(index: CheckpointIndex, name: str) -> list[str]:
    return [piece for piece, _ in index.tensors[name].piece_shapes(name)]


def _open_holding(index: CheckpointIndex, names: Iterable[str]) -> OpenFiles:
    """Opens the files of the named tensors, checks that their headers hold them as the index
    says (only then may memory be allocated for them) and prefetches them."""
    pieces = [piece for name in names for piece in _pieces(index, name)]
    files = OpenFiles(index, pieces)
    try:
        files.prefetch(pieces)
    except BaseException:
        files.close()
        raise
    return files


def read_whole_tensors(index: CheckpointIndex, names: Sequence[str], verify: bool = True) -> dict[str, torch.Tensor]:
    """Reads the named logical tensors whole, as new CPU tensors (sharded ones assembled).

    Raises:
        CorruptCheckpointError, ChecksumMismatchError, MissingShardFileError, IndexMismatchError:
            the files are damaged.
    """
    files = _open_holding(index, names)
    try:
        tensors = {name: torch.empty(index.tensors[name].shape, dtype=index.tensors[name].dtype) for name in names}
        template: dict[Key, object] = {}
        for name, tensor in tensors.items():
            path = decode_key(name)
            _parent(template, path)[path[-1]] = tensor
        plan = LoadPlan(index, template, None, strict=True, verify=verify)
    except BaseException:
        files.close()
        raise
    plan.check(files)
    plan.apply()
    return tensors
