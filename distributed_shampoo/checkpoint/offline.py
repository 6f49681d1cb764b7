# pyre-strict
"""Offline operations on a saved checkpoint: summarise, consolidate, rewrite for other ranks, diff.

They run in one process without ``torch.distributed`` and read tensors in batches of at most
``BATCH_BYTES`` (a larger tensor is read alone), so their memory stays bounded except where
noted.
"""

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from distributed_shampoo.checkpoint.api import commit_index, StagedSave
from distributed_shampoo.checkpoint.commit import new_save_id, new_token, staging_dir
from distributed_shampoo.checkpoint.errors import CheckpointExistsError, InvalidArgumentError
from distributed_shampoo.checkpoint.format import (
    CheckpointIndex,
    DTYPE_TO_NAME,
    shard_file_name,
    shard_header_metadata,
    whole_layout,
)
from distributed_shampoo.checkpoint.load import read_whole_tensors
from distributed_shampoo.checkpoint.parse import read_index
from distributed_shampoo.checkpoint.plan import GlobalPlan
from distributed_shampoo.checkpoint.values import encode_value
from distributed_shampoo.checkpoint.writer import write_safetensors, WrittenFile
from distributed_shampoo.utils.shampoo_checkpoint_utils import decode_key, param_key_path

BATCH_BYTES: int = 64 << 20

# ``(done, total)`` callbacks that report progress.
Progress = Callable[[int, int], None]


def _batches(index: CheckpointIndex, names: Sequence[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for name in names:
        nbytes = index.tensors[name].nbytes
        if batch and size + nbytes > BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(name)
        size += nbytes
    if batch:
        yield batch


def _report(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def parameter_of(name: str) -> str:
    """The parameter a logical tensor belongs to, for summaries: the key path up to the name that
    follows a ``"state"`` key (``optimizer/state/fc.weight``), or the whole path otherwise."""
    path = decode_key(name)
    return "/".join(str(key) for key in param_key_path(path) or path)


def summarize(index: CheckpointIndex) -> dict[str, object]:
    """A JSON-able summary: format, world size, user metadata, and per-file, per-parameter and
    per-dtype tensor counts and bytes."""
    stored_bytes: dict[str, int] = {}
    dtypes: dict[str, dict[str, int]] = {}
    parameters: dict[str, dict[str, int]] = {}
    for name, layout in index.tensors.items():
        for piece, shape in layout.piece_shapes(name):
            stored_bytes[piece] = math.prod(shape) * layout.dtype.itemsize
        for table, key in ((dtypes, DTYPE_TO_NAME[layout.dtype]), (parameters, parameter_of(name))):
            entry = table.setdefault(key, {"tensors": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["bytes"] += layout.nbytes
    files = {file: {"rank": rank, "tensors": 0, "bytes": 0} for rank, file in enumerate(index.shard_files())}
    for stored, file in index.weight_map.items():
        files[file]["tensors"] += 1
        files[file]["bytes"] += stored_bytes[stored]
    return {
        "path": str(index.directory),
        "format_version": index.format_version,
        "world_size": index.world_size,
        "total_size": index.total_size,
        "tensors": len(index.tensors),
        "stored_tensors": len(index.weight_map),
        "values": len(index.objects),
        "user_metadata": index.user_metadata,
        "files": files,
        "dtypes": dtypes,
        "parameters": parameters,
    }


def consolidate_checkpoint(
    checkpoint_dir: str | os.PathLike[str], out_file: str | os.PathLike[str], progress: Progress | None = None
) -> Path:
    """Writes every tensor of a checkpoint, whole, into one plain safetensors file.

    Tensors are named by their JSON-list key (``["optimizer", "state", "fc.weight", "step"]``);
    the non-tensor values and the user metadata go into the header's ``__metadata__`` as JSON
    (keys ``distributed_shampoo.values``, in the index's typed JSON, and
    ``distributed_shampoo.user``). Holds the whole
    checkpoint in memory. The file appears complete or not at all.

    Raises:
        CheckpointExistsError: ``out_file`` exists.
        CheckpointError: The checkpoint is missing or damaged.
    """
    index = read_index(checkpoint_dir)
    target = Path(out_file).absolute()
    if target.exists():
        raise CheckpointExistsError(f"{target} already exists")
    tensors: list[tuple[str, torch.Tensor]] = []
    names = list(index.tensors)
    for batch in _batches(index, names):
        tensors.extend(read_whole_tensors(index, batch).items())
        _report(progress, len(tensors), len(names))
    header = {
        "format": "pt",
        "distributed_shampoo.values": json.dumps({name: encode_value(value) for name, value in index.objects.items()}),
        "distributed_shampoo.user": json.dumps(index.user_metadata),
    }
    partial = target.parent / f".{target.name}.incomplete-{new_token()}"
    write_safetensors(partial, tensors, header)
    os.rename(partial, target)
    return target


def rewrite_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    writes_per_rank: Sequence[Sequence[str]],
    progress: Progress | None = None,
) -> CheckpointIndex:
    """Rewrites a checkpoint as if ``len(writes_per_rank)`` ranks had saved it, rank ``r`` writing
    the logical tensors ``writes_per_rank[r]`` (whole). Knows nothing of what the tensors are: the
    caller decides who writes what (``reshard`` asks the optimizer's block ownership). Values,
    containers and user metadata are kept; holds one rank's share in memory at a time (read in
    batches). The new checkpoint appears complete or not at all.

    Raises:
        InvalidArgumentError: No ranks, or the writes do not name every tensor exactly once.
        CheckpointExistsError: ``out_dir`` exists.
        CheckpointError: The checkpoint is missing or damaged.
    """
    world_size = len(writes_per_rank)
    if world_size < 1:
        raise InvalidArgumentError("rewrite_checkpoint: at least one rank must write")
    index = read_index(checkpoint_dir)
    named = [name for names in writes_per_rank for name in names]
    if sorted(named) != sorted(index.tensors):
        unknown, missing = sorted(set(named) - set(index.tensors)), sorted(set(index.tensors) - set(named))
        raise InvalidArgumentError(
            f"rewrite_checkpoint: the writes must name every tensor of {index.directory} once "
            f"(unknown {unknown[:3]}, missing {missing[:3]}, {len(named) - len(set(named))} repeated)"
        )
    target = Path(out_dir).absolute()
    if target.exists():
        raise CheckpointExistsError(f"{target} already exists")
    layouts = {name: whole_layout(layout.shape, layout.dtype) for name, layout in index.tensors.items()}
    save_id = new_save_id()
    staging = staging_dir(target, save_id[:16])
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    try:
        written: list[WrittenFile] = []
        for rank, names in enumerate(writes_per_rank):
            tensors: list[tuple[str, torch.Tensor]] = []
            for batch in _batches(index, names):
                tensors.extend(read_whole_tensors(index, batch).items())
            written.append(
                write_safetensors(
                    staging / shard_file_name(index.prefix, rank, world_size),
                    tensors,
                    shard_header_metadata(rank, world_size, save_id),
                )
            )
            _report(progress, rank + 1, world_size)
        writes = tuple(tuple(names) for names in writes_per_rank)
        plan = GlobalPlan(writes, tuple(() for _ in writes), layouts, index.objects, index.containers)
        staged = StagedSave(target, staging, save_id, index.prefix, plan, [], [], index.user_metadata, False)
        return commit_index(staged, plan, world_size, written)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@dataclass(frozen=True)
class TensorDifference:
    """How one tensor differs between two checkpoints.

    Attributes:
        name: The logical name (JSON-list key).
        problem: ``"shape"`` or ``"dtype"`` when they differ (then the values are not compared),
            else ``"values"``.
        max_abs: The largest ``|a - b|`` (NaN where only one side is NaN counts as inf).
        max_rel: The largest ``|a - b| / max(|a|, |b|)`` over elements that differ.
        elements: How many elements differ.
    """

    name: str
    problem: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    elements: int = 0


@dataclass(frozen=True)
class CheckpointDiff:
    """The differences between checkpoints A and B."""

    only_in_a: list[str]
    only_in_b: list[str]
    tensors: list[TensorDifference]
    values: list[tuple[str, object, object]]  # (name, A's value, B's value) of non-tensor leaves
    equal_tensors: int

    @property
    def identical(self) -> bool:
        return not (self.only_in_a or self.only_in_b or self.tensors or self.values)


def _compare(name: str, a: torch.Tensor, b: torch.Tensor) -> TensorDifference | None:
    if a.shape != b.shape:
        return TensorDifference(name, "shape")
    if a.dtype != b.dtype:
        return TensorDifference(name, "dtype")
    if torch.equal(a, b):
        return None
    # float64 (complex128) holds every float dtype's values exactly, and ints up to 2^53 (enough
    # for a report).
    wide = torch.complex128 if a.is_complex() else torch.float64
    wide_a, wide_b = a.to(wide), b.to(wide)
    same = a == b if not (a.is_floating_point() or a.is_complex()) else (wide_a == wide_b) | (wide_a.isnan() & wide_b.isnan())
    if bool(same.all()):
        return None
    difference = (wide_a - wide_b).abs().nan_to_num(nan=math.inf)
    relative = (difference / torch.maximum(wide_a.abs(), wide_b.abs())).nan_to_num(nan=math.inf)
    differing = ~same
    return TensorDifference(
        name, "values", float(difference[differing].max()), float(relative[differing].max()), int(differing.sum())
    )


def diff_checkpoints(
    a_dir: str | os.PathLike[str], b_dir: str | os.PathLike[str], progress: Progress | None = None
) -> CheckpointDiff:
    """Compares two checkpoints tensor by tensor (at any world sizes: logical tensors are compared).

    NaNs at the same positions count as equal.

    Raises:
        CheckpointError: Either checkpoint is missing or damaged.
    """
    a, b = read_index(a_dir), read_index(b_dir)
    common = [name for name in a.tensors if name in b.tensors]
    differences: list[TensorDifference] = []
    done = 0
    for batch in _batches(a, common):
        a_tensors, b_tensors = read_whole_tensors(a, batch), read_whole_tensors(b, batch)
        for name in batch:
            difference = _compare(name, a_tensors[name], b_tensors[name])
            if difference is not None:
                differences.append(difference)
        done += len(batch)
        _report(progress, done, len(common))
    a_names, b_names = set(a.tensors) | set(a.objects), set(b.tensors) | set(b.objects)
    values = [
        (name, a.objects[name], b.objects[name])
        for name in a.objects
        if name in b.objects and json.dumps(encode_value(a.objects[name])) != json.dumps(encode_value(b.objects[name]))
    ]
    values += [(name, a.objects[name], "<tensor>") for name in a.objects if name in b.tensors]
    values += [(name, "<tensor>", b.objects[name]) for name in b.objects if name in a.tensors]
    return CheckpointDiff(
        only_in_a=sorted(a_names - b_names),
        only_in_b=sorted(b_names - a_names),
        tensors=differences,
        values=values,
        equal_tensors=len(common) - len(differences),
    )

