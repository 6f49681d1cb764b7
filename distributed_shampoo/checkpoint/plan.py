# pyre-strict
"""Pure planning: which leaves a state dict holds, and which rank writes which tensor.

A state dict is any nesting of dicts (str or int keys), lists and tuples whose leaves are tensors,
DTensors, or values (``int``/``float``/``bool``/``str``/``None``, torch dtypes, this package's
config dataclasses: ``values``). Leaves are named by the utils'
``encode_key`` of their key path, e.g. ``["state", "fc.weight", "block_0", "momentum"]``.

A mapping whose keys are all JSON lists of str and int (what the utils' ``flatten`` returns, as
the reference's ``distributed_state_dict`` does per parameter) is the nesting it spells: its
leaf ``'["block_0", "momentum"]'`` under ``["state", "fc.weight"]`` is named as above, so the
flattened and the nested form of a state save the same checkpoint and load from each other's.
"""

import functools
import json
import math
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring_ascii
from dataclasses import dataclass
from typing import cast, NamedTuple, TypeVar

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from distributed_shampoo.checkpoint.errors import InconsistentStateError, UnsupportedValueError
from distributed_shampoo.checkpoint.format import (
    chunk_name,
    ChunkLayout,
    DTYPE_TO_NAME,
    NAME_TO_DTYPE,
    TensorLayout,
    whole_layout,
    tiling_problem,
)
from distributed_shampoo.checkpoint.values import CONFIG_TYPES, encode_value, is_value
from distributed_shampoo.utils.shampoo_checkpoint_utils import encode_key, Key

# How a local plan marks a dict that is empty on that rank (the index records it as "dict").
EMPTY_DICT = "empty dict"

Path = tuple[Key, ...]

# What save and load accept: any mapping keyed by str or int (a user's ``dict[str, Tensor]`` too).
StateDict = Mapping[str, object] | Mapping[int, object] | Mapping[Key, object]


def child_prefix(prefix: str, key: Key) -> str:
    """The name of ``key`` under the node named ``prefix``, without its closing bracket ("" is the
    root): ``close_name(child_prefix(...))`` equals ``encode_key`` of the path, but a walk builds
    names a component at a time instead of encoding every path whole (the cost per leaf of a save
    or load)."""
    component = encode_basestring_ascii(key) if isinstance(key, str) else int.__repr__(key)
    return f"{prefix}, {component}" if prefix else f"[{component}"


def close_name(prefix: str) -> str:
    """The ``encode_key`` name of the node ``child_prefix`` built ``prefix`` for."""
    return f"{prefix}]" if prefix else "[]"


# Any key type: the walkers check that keys are str or int themselves.
_AnyKey = TypeVar("_AnyKey")


@functools.lru_cache(maxsize=65536)
def _spelled_path(key: str) -> tuple[Key, ...] | None:
    """The key path a JSON-list key spells, or None for any other string. Cached: the same keys
    recur in every parameter's state."""
    if not key.startswith("["):
        return None
    try:
        path = json.loads(key)
    except ValueError:
        return None
    if not isinstance(path, list) or not path or any(isinstance(k, bool) or not isinstance(k, (str, int)) for k in path):
        return None
    return tuple(path)


def flattened_paths(node: Mapping[_AnyKey, object]) -> list[tuple[Key, ...]] | None:
    """The key path each key of ``node`` spells, in order, when every key spells one (a
    flattened mapping); None otherwise."""
    spelled = [_spelled_path(key) if isinstance(key, str) else None for key in node]
    return cast(list[tuple[Key, ...]], spelled) if spelled and None not in spelled else None


def key_paths(node: Mapping[_AnyKey, object]) -> Sequence[tuple[object, ...]]:
    """The key path each key of ``node`` stands for: the path it spells in a flattened mapping,
    else the key alone."""
    return flattened_paths(node) or [(key,) for key in node]


@functools.lru_cache(maxsize=65536)
def _canonically_spelled(key: str) -> bool:
    """Whether ``key`` is exactly ``encode_key`` of the path it spells."""
    path = _spelled_path(key)
    return path is not None and encode_key(path) == key


def spelled_prefix(prefix: str, key: object, path: tuple[Key, ...]) -> str:
    """The name prefix of the child at ``key`` of a mapping, where ``key_paths`` gave ``path``:
    ``child_prefix`` applied along ``path``. A key that spells its path as ``encode_key`` would
    (the optimizer's flattened keys) is that text already, so it is reused instead of being built
    a component at a time (the cost per leaf of a load)."""
    if path != (key,) and isinstance(key, str) and _canonically_spelled(key):
        return f"{prefix}, {key[1:-1]}" if prefix else key[:-1]
    for component in path:
        prefix = child_prefix(prefix, component)
    return prefix


def _spelled_conflict(paths: list[tuple[Key, ...]]) -> tuple[Key, ...] | None:
    """A path of a flattened mapping that another repeats or lies under, or None."""
    seen: set[tuple[Key, ...]] = set()
    inner: set[tuple[Key, ...]] = set()
    for path in paths:
        if path in seen or path in inner:
            return path
        seen.add(path)
        inner.update(path[:end] for end in range(1, len(path)))
    return next((path for path in paths if path in inner), None)


def named_leaves(state: StateDict, containers: dict[str, str] | None = None) -> list[tuple[str, object]]:
    """``(name, leaf)`` for every tensor and scalar in ``state``, depth first, named by
    ``encode_key`` of the key path.

    Args:
        state: The nested state.
        containers: If given, receives ``name -> "list" | "tuple" | "dict"`` for every list,
            tuple and dict below the root (an empty dict as ``"empty dict"``): the index keeps
            what rebuilding the nesting needs, and ranks are checked to agree on the rest.

    Raises:
        UnsupportedValueError: For any other value or a key that is not str/int; names the key.
    """
    leaves: list[tuple[str, object]] = []
    if not isinstance(state, Mapping):
        raise UnsupportedValueError(f"a state dict must be a mapping, got {type(state).__name__}")
    _collect_leaves(state, "", leaves, containers)
    return leaves


def _collect_leaves(node: object, prefix: str, leaves: list[tuple[str, object]], containers: dict[str, str] | None) -> None:
    """``named_leaves``' walk. Module functions, not nested ones: nested walkers that call each
    other form a reference cycle, which kept the returned list alive until the garbage collector
    ran."""
    if isinstance(node, torch.Tensor) or is_value(node):
        leaves.append((close_name(prefix), node))
    elif isinstance(node, Mapping):
        if containers is not None and prefix:
            containers[close_name(prefix)] = "dict" if node else EMPTY_DICT
        paths = flattened_paths(node)
        if paths is not None:
            _collect_flattened_leaves(node, paths, prefix, leaves, containers)
            return
        for key, value in node.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise UnsupportedValueError(
                    f"{close_name(prefix)}: key {key!r} is a {type(key).__name__}; keys must be str or int"
                )
            _collect_leaves(value, child_prefix(prefix, key), leaves, containers)
    elif isinstance(node, (list, tuple)):
        if containers is not None:
            containers[close_name(prefix)] = "tuple" if isinstance(node, tuple) else "list"
        for position, value in enumerate(node):
            _collect_leaves(value, child_prefix(prefix, position), leaves, containers)
    else:
        raise UnsupportedValueError(
            f"{close_name(prefix)}: cannot save a {type(node).__module__}.{type(node).__qualname__} "
            "without pickling; leaves must be tensors, DTensors, int, float, bool, str, None, torch dtypes "
            f"or this package's configs ({', '.join(sorted(CONFIG_TYPES))})"
        )


def _collect_flattened_leaves(
    node: Mapping[object, object],
    paths: list[tuple[Key, ...]],
    prefix: str,
    leaves: list[tuple[str, object]],
    containers: dict[str, str] | None,
) -> None:
    if (conflict := _spelled_conflict(paths)) is not None:
        raise UnsupportedValueError(
            f"{close_name(prefix)}: the flattened key {encode_key(list(conflict))} is spelled twice, "
            "or another key lies under it"
        )
    registered: set[tuple[Key, ...]] = set()  # parent paths whose containers are recorded
    for (key, value), path in zip(node.items(), paths):
        if containers is not None and path[:-1] not in registered:
            registered.add(path[:-1])
            parent = prefix
            for component in path[:-1]:
                parent = child_prefix(parent, component)
                containers[close_name(parent)] = "dict"
        _collect_leaves(value, spelled_prefix(prefix, key, path), leaves, containers)


def dtype_name(name: str, dtype: torch.dtype) -> str:
    """The safetensors name of ``dtype``.

    Raises:
        UnsupportedValueError: If safetensors cannot store it; names the leaf.
    """
    if dtype not in DTYPE_TO_NAME:
        raise UnsupportedValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
    return DTYPE_TO_NAME[dtype]


def local_region(tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(global offsets, local shape)`` of the part of ``tensor`` this rank holds.

    A plain tensor (or a replicated DTensor) holds the whole tensor at offset zero.
    """
    if isinstance(tensor, DTensor):
        shape, offsets = compute_local_shape_and_global_offset(
            tensor.shape, tensor.device_mesh, tensor.placements
        )
        return tuple(offsets), tuple(shape)
    return (0,) * tensor.dim(), tuple(tensor.shape)


def local_data(tensor: torch.Tensor) -> torch.Tensor:
    """The local tensor that holds this rank's region (the DTensor's local shard)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_box(name: str, tensor: torch.Tensor, error: type[Exception]) -> tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]:
    """``(global offsets, local shape, local tensor)`` of this rank's region of ``tensor``.

    Raises:
        error: A DTensor whose local tensor does not have the shape its placements give it.
    """
    offsets, shape = local_region(tensor)
    local = local_data(tensor)
    if tuple(local.shape) != shape:
        raise error(
            f"{name}: the DTensor's local tensor has shape {list(local.shape)} but its placements give "
            f"this rank a {list(shape)} region of the {list(tensor.shape)} tensor"
        )
    return offsets, shape, local


def _is_writer(name: str, tensor: DTensor) -> bool:
    """Whether this rank writes its local part: it must be the first replica on every
    replicated mesh dimension (so each chunk is written exactly once)."""
    check_placements(name, tensor, UnsupportedValueError)
    coordinate = tensor.device_mesh.get_coordinate()
    if coordinate is None:
        return False
    return all(
        coordinate[mesh_dim] == 0 for mesh_dim, placement in enumerate(tensor.placements) if isinstance(placement, Replicate)
    )


def check_placements(name: str, tensor: DTensor, error: type[Exception]) -> None:
    """Raises ``error`` unless every placement is ``Replicate`` or ``Shard`` (whose local data is a
    box of the global tensor): a ``Partial`` DTensor holds unreduced values, and other shardings
    (e.g. strided) are not boxes."""
    for placement in tensor.placements:
        if isinstance(placement, Partial):
            raise error(
                f"{name}: a DTensor with a Partial placement holds unreduced values; reduce it "
                "(e.g. .redistribute(placements=[Replicate()])) first"
            )
        if not isinstance(placement, Replicate) and type(placement) is not Shard:
            raise error(f"{name}: DTensor placement {placement} is not supported (only Replicate and Shard)")


class PlannedTensor(NamedTuple):
    """What one rank offers to write for one logical tensor (metadata only, picklable). A named
    tuple: a save makes and sends one per tensor, and tuples are the cheapest to build and pickle."""

    name: str
    dtype: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    local_shape: tuple[int, ...]
    chunked: bool  # a Shard DTensor's chunk, rather than a whole tensor

    @property
    def stored_name(self) -> str:
        return chunk_name(self.name, self.offsets) if self.chunked else self.name


@dataclass(frozen=True)
class LocalPlan:
    """One rank's description of its state dict, exchanged with ``all_gather``."""

    tensors: tuple[PlannedTensor, ...]
    objects: dict[str, object]
    containers: dict[str, str]


def plan_local(state_dict: StateDict) -> tuple[LocalPlan, dict[str, torch.Tensor]]:
    """Describes this rank's state dict.

    Returns:
        The picklable plan, and stored name -> the local tensor to write if chosen.

    Raises:
        UnsupportedValueError: For a value that cannot be saved; names its key.
    """
    containers: dict[str, str] = {}
    planned: list[PlannedTensor] = []
    data: dict[str, torch.Tensor] = {}
    objects: dict[str, object] = {}
    for name, leaf in named_leaves(state_dict, containers):
        if not isinstance(leaf, torch.Tensor):
            try:
                objects[name] = encode_value(leaf)
            except UnsupportedValueError as error:
                raise UnsupportedValueError(f"{name}: {error}") from None
            continue
        if leaf.layout != torch.strided:
            raise UnsupportedValueError(f"{name}: only strided (dense) tensors can be saved, got {leaf.layout}")
        dtype = dtype_name(name, leaf.dtype)
        if leaf.is_meta:
            raise UnsupportedValueError(f"{name}: a tensor on the meta device holds no data to save")
        shape = tuple(leaf.shape)
        if not isinstance(leaf, DTensor):  # the common case: a whole tensor, offered whole
            planned.append(PlannedTensor(name, dtype, shape, (0,) * len(shape), shape, False))
            data[name] = leaf
            continue
        if not _is_writer(name, leaf):
            continue
        offsets, local_shape, local = local_box(name, leaf, InconsistentStateError)
        if leaf.numel() == 0:  # nothing to shard: every rank offers the empty tensor whole
            offsets, local_shape, local = (0,) * leaf.dim(), shape, torch.empty(shape, dtype=leaf.dtype)
        chunked = local_shape != shape
        if chunked and math.prod(local_shape) == 0:
            continue  # an empty shard of an uneven split holds nothing to write
        entry = PlannedTensor(name, dtype, shape, offsets, local_shape, chunked)
        planned.append(entry)
        data[entry.stored_name] = local
    return LocalPlan(tuple(planned), objects, containers), data


@dataclass(frozen=True)
class GlobalPlan:
    """The decisions every rank derives identically from all ranks' ``LocalPlan``s.

    Attributes:
        writes: Per rank, the stored names it writes.
        replicas: Per rank, the whole tensors it holds but another rank writes (their checksums
            must equal the writer's).
        tensors: The index's layouts.
        objects: The non-tensor leaves.
        containers: The index's containers (lists, tuples, dicts empty on some rank).
    """

    writes: tuple[tuple[str, ...], ...]
    replicas: tuple[tuple[str, ...], ...]
    tensors: dict[str, TensorLayout]
    objects: dict[str, object]
    containers: dict[str, str]


def plan_global(local_plans: Sequence[LocalPlan]) -> GlobalPlan:
    """Decides who writes what and checks that the ranks agree.

    A whole tensor offered by several ranks is replicated state, written by the lowest of them
    (the others' copies are compared by checksum when the files are written). Chunks of a sharded
    tensor are written by the rank that holds them and must tile the global tensor exactly.

    Raises:
        InconsistentStateError: Ranks disagree on a key's shape, dtype, kind (tensor, value, list,
            tuple or dict) or value, or the chunks of a sharded tensor do not tile it exactly;
            names the key and the ranks.
    """
    first_offer: dict[str, tuple[int, PlannedTensor]] = {}
    chunks: dict[str, dict[tuple[int, ...], tuple[int, PlannedTensor]]] = {}
    for rank, plan in enumerate(local_plans):
        for offer in plan.tensors:
            if offer.name in first_offer:
                other_rank, other = first_offer[offer.name]
                if (other.dtype, other.global_shape, other.chunked) != (offer.dtype, offer.global_shape, offer.chunked):
                    raise InconsistentStateError(
                        f"{offer.name}: rank {other_rank} has {_describe(other)} but rank {rank} has "
                        f"{_describe(offer)}"
                    )
            else:
                first_offer[offer.name] = (rank, offer)
            if offer.chunked:
                chunks.setdefault(offer.name, {}).setdefault(offer.offsets, (rank, offer))
    objects = merge_values([plan.objects for plan in local_plans])
    kinds = _merge_kinds(local_plans)
    _check_kinds(first_offer, objects, kinds)
    writes: list[list[str]] = [[] for _ in local_plans]
    replicas: list[list[str]] = [[] for _ in local_plans]
    tensors: dict[str, TensorLayout] = {}
    for name, (rank, offer) in first_offer.items():
        if not offer.chunked:
            writes[rank].append(name)
            tensors[name] = whole_layout(offer.global_shape, NAME_TO_DTYPE[offer.dtype])
            continue
        dtype = NAME_TO_DTYPE[offer.dtype]
        pieces = sorted(chunks[name].values(), key=lambda item: item[1].offsets)
        problem = tiling_problem(offer.global_shape, [(piece.offsets, piece.local_shape) for _, piece in pieces])
        if problem is not None:
            raise InconsistentStateError(
                f"{name}: the ranks' chunks do not tile the {list(offer.global_shape)} tensor exactly: {problem}"
            )
        layout_chunks = []
        for chunk_rank, piece in pieces:
            writes[chunk_rank].append(piece.stored_name)
            layout_chunks.append(ChunkLayout(piece.stored_name, piece.offsets, piece.local_shape))
        tensors[name] = TensorLayout(offer.global_shape, dtype, tuple(layout_chunks))
    for rank, plan in enumerate(local_plans):
        replicas[rank] = [t.name for t in plan.tensors if not t.chunked and first_offer[t.name][0] != rank]
    return GlobalPlan(
        writes=tuple(tuple(w) for w in writes),
        replicas=tuple(tuple(r) for r in replicas),
        tensors=tensors,
        objects=objects,
        containers={name: kind for name, (kind, empty) in kinds.items() if kind != "dict" or empty},
    )


def _merge_kinds(local_plans: Sequence[LocalPlan]) -> dict[str, tuple[str, bool]]:
    """Container name -> (kind, empty on some rank); the same name as two kinds is an error."""
    merged: dict[str, tuple[str, int, bool]] = {}
    for rank, plan in enumerate(local_plans):
        for name, local_kind in plan.containers.items():
            kind = "dict" if local_kind == EMPTY_DICT else local_kind
            if name not in merged:
                merged[name] = (kind, rank, local_kind == EMPTY_DICT)
                continue
            other_kind, other_rank, empty = merged[name]
            if kind != other_kind:
                raise InconsistentStateError(f"{name}: rank {other_rank} has a {other_kind} but rank {rank} has a {kind}")
            merged[name] = (kind, other_rank, empty or local_kind == EMPTY_DICT)
    return {name: (kind, empty) for name, (kind, _, empty) in merged.items()}


def _check_kinds(
    tensors: dict[str, tuple[int, PlannedTensor]], objects: dict[str, object], kinds: dict[str, tuple[str, bool]]
) -> None:
    """A name must be one kind of thing on every rank: a tensor, a value, or a container."""
    for name in tensors.keys() & objects.keys():
        raise InconsistentStateError(f"{name}: rank {tensors[name][0]} has a tensor but another rank has a value there")
    for name in (tensors.keys() | objects.keys()) & kinds.keys():
        raise InconsistentStateError(
            f"{name}: one rank has a {kinds[name][0]} but another has a {'tensor' if name in tensors else 'value'} there"
        )


def _describe(offer: PlannedTensor) -> str:
    kind = "a chunk of a sharded" if offer.chunked else "a whole"
    return f"{kind} {offer.dtype} tensor of shape {list(offer.global_shape)}"


def merge_values(per_rank: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """The union of every rank's values (non-tensor leaves, ``LocalPlan.objects``).

    Raises:
        InconsistentStateError: Two ranks hold different values under one name; names it and
            the ranks.
    """
    merged: dict[str, object] = {}
    owner: dict[str, int] = {}
    for rank, values in enumerate(per_rank):
        for name, value in values.items():
            if name not in merged:
                merged[name], owner[name] = value, rank
            elif json.dumps(merged[name]) != json.dumps(value):
                raise InconsistentStateError(
                    f"{name}: rank {owner[name]} has value {merged[name]!r} but rank {rank} has {value!r}"
                )
    return merged
