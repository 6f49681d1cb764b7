# pyre-strict
"""The public entry points: save, load, read the index, verify."""

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import overload, TypeVar

import torch
import torch.distributed as dist

from distributed_shampoo.checkpoint.collectives import Group
from distributed_shampoo.checkpoint.commit import new_token, publish, staging_dir
from distributed_shampoo.checkpoint.errors import (
    CheckpointError,
    CheckpointExistsError,
    DistributedSaveError,
    IndexMismatchError,
    UnsupportedValueError,
)
from distributed_shampoo.checkpoint.format import (
    check_checksum,
    check_header_entry,
    CheckpointIndex,
    DEFAULT_PREFIX,
    index_file_name,
    index_to_json,
    read_header,
    read_index,
    shard_file_name,
    shard_header_metadata,
)
from distributed_shampoo.checkpoint.load import fill_template, KeySelection, template_from_index
from distributed_shampoo.checkpoint.plan import GlobalPlan, LocalPlan, plan_global, plan_local, StateDict
from distributed_shampoo.checkpoint.reader import open_shard, read_ranges, ReadRequest
from distributed_shampoo.checkpoint.writer import write_json, write_safetensors
from distributed_shampoo.utils.shampoo_checkpoint_utils import Key

@dataclass(frozen=True)
class _Prepared:
    """What a rank reports after planning: its plan, or why it cannot save."""

    plan: LocalPlan | None
    error: CheckpointError | None
    token: str | None  # rank 0: the staging directory's token


@dataclass(frozen=True)
class _Written:
    """What a rank reports after writing its file: checksums, or why it failed."""

    checksums: dict[str, str] | None
    error: str | None


def save_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    state_dict: StateDict,
    *,
    process_group: dist.ProcessGroup | None = None,
    metadata: Mapping[str, object] | None = None,
    prefix: str = DEFAULT_PREFIX,
    overwrite: bool = False,
) -> Path:
    """Saves a (possibly distributed) state dict as per-rank safetensors files plus an index.

    Collective when ``torch.distributed`` is initialised: every rank of ``process_group`` (default:
    the world) calls it with its own state dict. Rank ``r`` writes
    ``<prefix>-<r+1:05d>-of-<world:05d>.safetensors``; rank 0 writes
    ``<prefix>.safetensors.index.json`` and publishes the directory atomically, so a crash at any
    moment leaves either the previous checkpoint or the new one, never a half one.

    Args:
        checkpoint_dir: The checkpoint's directory (created; its parent must be shared by all
            ranks).
        state_dict: Nested dicts (str/int keys), lists and tuples of tensors, DTensors and
            ``int``/``float``/``bool``/``str``/``None``. A plain tensor under the same key on
            several ranks is replicated state and written once (by the lowest rank).
        process_group: The ranks saving together.
        metadata: JSON-serialisable values stored in the index under ``metadata.user``.
        prefix: The file name prefix.
        overwrite: Replace an existing checkpoint at ``checkpoint_dir``; it stays intact until the
            new one is complete.

    Returns:
        The checkpoint directory.

    Raises:
        UnsupportedValueError: A leaf or key cannot be saved without pickling (names the key).
        CheckpointExistsError: ``checkpoint_dir`` exists and ``overwrite`` is false.
        InconsistentStateError: Ranks disagree on a key (names it and the ranks).
        DistributedSaveError: Another rank failed; this rank raises the same outcome.
        OSError: Writing failed on this rank (others raise ``DistributedSaveError``).
    """
    group = Group.resolve(process_group)
    return finish_save(stage_save(group, checkpoint_dir, state_dict, metadata, prefix, overwrite), group)


@dataclass(frozen=True)
class StagedSave:
    """A save whose plan every rank agreed on; what is left is writing and committing.

    Attributes:
        target: The checkpoint directory to publish.
        staging: The hidden directory the files go to first.
        prefix: The file name prefix.
        plan: Every rank's writes and the index's layouts.
        writes: This rank's ``(stored name, tensor)`` pairs, in write order.
        metadata: The user metadata for the index.
        overwrite: Whether an existing ``target`` may be replaced.
    """

    target: Path
    staging: Path
    prefix: str
    plan: GlobalPlan
    writes: list[tuple[str, torch.Tensor]]
    metadata: Mapping[str, object] | None
    overwrite: bool


def stage_save(
    group: Group,
    checkpoint_dir: str | os.PathLike[str],
    state_dict: StateDict,
    metadata: Mapping[str, object] | None,
    prefix: str,
    overwrite: bool,
) -> StagedSave:
    """The first half of a save: plan on every rank, agree on the plan (one collective on ``group``).

    Rank 0 checks the target and creates the staging directory. A failure on any rank raises on
    every rank (the same error class), and the staging directory is removed.
    """
    target = Path(checkpoint_dir).absolute()
    prepared, local_plan_data, own_prepare_error = _prepare(group, target, state_dict, metadata, overwrite)
    everyone = group.all_gather(prepared)
    failure = next(((rank, p.error) for rank, p in enumerate(everyone) if p.error is not None), None)
    token = everyone[0].token
    staging = staging_dir(target, token) if token is not None else None
    try:
        if failure is not None:
            rank, error = failure
            raise own_prepare_error if rank == group.rank and own_prepare_error is not None else error
        global_plan = plan_global([p.plan for p in everyone if p.plan is not None])
    except BaseException:
        if group.rank == 0 and staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    assert staging is not None
    writes = [(name, local_plan_data[name]) for name in global_plan.writes[group.rank]]
    return StagedSave(target, staging, prefix, global_plan, writes, metadata, overwrite)


def finish_save(staged: StagedSave, group: Group, failed: Exception | None = None) -> Path:
    """The second half of a save: write this rank's file, then rank 0 commits the index.

    Two collectives on ``group`` (which must hold the same ranks, in the same order, as the group
    that staged the save): gather the written files' checksums, broadcast the outcome.

    Args:
        staged: What ``stage_save`` returned.
        group: The ranks finishing the save together.
        failed: Set when this rank failed between staging and writing: it writes nothing and
            reports the failure, so that every rank fails the save instead of waiting.

    Returns:
        The published checkpoint directory.

    Raises:
        OSError or CheckpointError: This rank failed; DistributedSaveError: another rank did.
    """
    own_error: BaseException | None = None
    try:
        if failed is not None:
            raise failed
        checksums = write_safetensors(
            staged.staging / shard_file_name(staged.prefix, group.rank, group.world_size),
            staged.writes,
            shard_header_metadata(group.rank, group.world_size),
        )
        written = _Written(checksums, None)
    except Exception as error:  # reported to every rank so that none waits forever
        own_error = error
        written = _Written(None, f"rank {group.rank}: {type(error).__name__}: {error}")
    results = group.all_gather(written)
    commit_error: str | None = next((r.error for r in results if r.error is not None), None)
    if group.rank == 0:
        if commit_error is None:
            try:
                commit_index(staged, group.world_size, [r.checksums or {} for r in results])
            except Exception as error:
                own_error = own_error or error
                commit_error = f"rank 0: committing failed: {type(error).__name__}: {error}"
        if commit_error is not None:
            shutil.rmtree(staged.staging, ignore_errors=True)
    commit_error = group.broadcast_from_first(commit_error)
    if own_error is not None:
        raise own_error
    if commit_error is not None:
        raise DistributedSaveError(f"saving {staged.target} failed, nothing was published: {commit_error}")
    return staged.target


def _prepare(
    group: Group,
    target: Path,
    state_dict: StateDict,
    metadata: Mapping[str, object] | None,
    overwrite: bool,
) -> tuple[_Prepared, dict[str, torch.Tensor], Exception | None]:
    """Plans this rank's part; rank 0 also checks the target and creates the staging directory.

    Never raises: a failure is reported to every rank (so none waits in the collective) and
    returned as the third element, to be raised on this rank.
    """
    try:
        _check_metadata(metadata)
        plan, data = plan_local(state_dict)
        token = None
        if group.rank == 0:
            if target.exists() and not overwrite:
                raise CheckpointExistsError(
                    f"{target} already exists; pass overwrite=True to replace it (it stays intact "
                    "until the new checkpoint is complete)"
                )
            token = new_token()
            target.parent.mkdir(parents=True, exist_ok=True)
            staging_dir(target, token).mkdir()
        return _Prepared(plan, None, token), data, None
    except Exception as error:
        shared = error if isinstance(error, CheckpointError) else DistributedSaveError(
            f"saving {target} failed on rank {group.rank}: {type(error).__name__}: {error}"
        )
        return _Prepared(None, shared, None), {}, error


def _check_metadata(metadata: Mapping[str, object] | None) -> None:
    try:
        json.dumps(dict(metadata or {}), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise UnsupportedValueError(f"metadata must be JSON-serialisable without NaN/inf: {error}") from None


def commit_index(staged: StagedSave, world_size: int, checksums_per_rank: list[dict[str, str]]) -> CheckpointIndex:
    """Writes the index of a staged save whose files are all written, then publishes it.

    Returns:
        The index written.

    Raises:
        CheckpointExistsError: The target appeared meanwhile and ``overwrite`` is false.
    """
    weight_map: dict[str, str] = {}
    checksums: dict[str, str] = {}
    for rank, rank_checksums in enumerate(checksums_per_rank):
        for name, digest in rank_checksums.items():
            weight_map[name] = shard_file_name(staged.prefix, rank, world_size)
            checksums[name] = digest
    plan, target = staged.plan, staged.target
    index = CheckpointIndex(
        directory=target,
        prefix=staged.prefix,
        world_size=world_size,
        total_size=sum(layout.nbytes for layout in plan.tensors.values()),
        weight_map=weight_map,
        tensors=plan.tensors,
        checksums=checksums,
        objects=plan.objects,
        containers=plan.containers,
        user_metadata=dict(staged.metadata or {}),
    )
    write_json(staged.staging / index_file_name(staged.prefix), index_to_json(index))
    if target.exists() and not staged.overwrite:
        raise CheckpointExistsError(f"{target} appeared while saving; the new checkpoint was discarded")
    publish(staged.staging, target)
    return index


_Template = TypeVar("_Template", bound=StateDict)


@overload
def load_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    state_dict: None = None,
    *,
    keys: KeySelection | None = None,
    strict: bool = True,
    verify: bool = True,
) -> dict[Key, object]: ...


@overload
def load_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    state_dict: _Template,
    *,
    keys: KeySelection | None = None,
    strict: bool = True,
    verify: bool = True,
) -> _Template: ...


def load_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    state_dict: StateDict | None = None,
    *,
    keys: KeySelection | None = None,
    strict: bool = True,
    verify: bool = True,
) -> StateDict:
    """Loads a checkpoint saved at any world size. Needs no collective.

    With a template ``state_dict`` (e.g. the optimizer's ``distributed_state_dict()`` at the new
    world size) every tensor is filled **in place** with the region it holds (a plain tensor: the
    whole logical tensor; a ``Shard`` DTensor: its local shard, assembled from the saved pieces),
    reading only those bytes; non-tensor leaves are replaced by the saved values converted to the
    template's Python type; tuples are rebuilt (they are immutable), dicts and lists are updated in
    place. Keys only in the checkpoint are not read.

    Without a template, returns the whole checkpoint (or the ``keys`` selected) as CPU tensors
    and plain values, nested as saved.

    Args:
        checkpoint_dir: The checkpoint directory.
        state_dict: The template to fill, or ``None``.
        keys: Restricts loading to these top-level keys or key paths (prefixes of leaf paths).
        strict: Raise for template keys the checkpoint does not hold; when false they keep their
            values.
        verify: Check every stored tensor read whole against its checksum (partial reads of a
            resharded piece cannot be; ``verify_checkpoint`` checks everything).

    Returns:
        The filled template, or the loaded state.

    Raises:
        CheckpointNotFoundError, IncompatibleFormatError, CorruptCheckpointError,
        ChecksumMismatchError, IndexMismatchError, MissingShardFileError: the checkpoint is
            missing or damaged.
        MissingKeyError: ``strict`` and the template asks for keys the checkpoint lacks.
        TemplateMismatchError: A template leaf has another shape, dtype or kind of value.
    """
    index = read_index(checkpoint_dir)
    template = template_from_index(index, keys) if state_dict is None else state_dict
    fill_template(index, template, keys, strict, verify)
    return template


def read_checkpoint_index(checkpoint_dir: str | os.PathLike[str]) -> CheckpointIndex:
    """Reads and validates the index of a complete checkpoint (no tensor data is read).

    Raises:
        CheckpointNotFoundError, IncompatibleFormatError, CorruptCheckpointError.
    """
    return read_index(checkpoint_dir)


@dataclass(frozen=True)
class VerificationReport:
    """What ``check_checkpoint`` found.

    Attributes:
        index: The parsed index, or None if it could not be read.
        problems: Every problem found, in file order (empty: the checkpoint is intact).
        files_checked: How many shard files were read.
    """

    index: CheckpointIndex | None
    problems: tuple[CheckpointError, ...]
    files_checked: int

    @property
    def ok(self) -> bool:
        return not self.problems


def check_checkpoint(
    checkpoint_dir: str | os.PathLike[str], progress: Callable[[int, int], None] | None = None
) -> VerificationReport:
    """Checks a whole checkpoint and reports every problem instead of stopping at the first.

    Checks that every shard file exists and is well formed, agrees with the index (names, shapes,
    dtypes, total size), and that every stored tensor matches its checksum. Reads every file once,
    each tensor into one scratch buffer the size of the largest tensor.

    Args:
        checkpoint_dir: The checkpoint directory.
        progress: Called with ``(files checked, files)`` after each file.

    Returns:
        The report; it never raises for a damaged checkpoint.
    """
    try:
        index = read_index(checkpoint_dir)
    except CheckpointError as error:
        return VerificationReport(None, (error,), 0)
    pieces = {
        piece.name: (layout.dtype, piece.shape)
        for name, layout in index.tensors.items()
        for piece in layout.stored_pieces(name)
    }
    problems: list[CheckpointError] = []
    stored_bytes = 0
    files = index.shard_files()
    for done, file_name in enumerate(files, start=1):
        try:
            stored_bytes += _check_file(index, file_name, pieces, problems)
        except CheckpointError as error:
            problems.append(error)
        if progress is not None:
            progress(done, len(files))
    if not problems and stored_bytes != index.total_size:
        problems.append(
            IndexMismatchError(
                f"{index.directory}: files hold {stored_bytes} bytes of tensor data, the index's total_size "
                f"says {index.total_size}"
            )
        )
    return VerificationReport(index, tuple(problems), len(files))


def _check_file(
    index: CheckpointIndex,
    file_name: str,
    pieces: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    problems: list[CheckpointError],
) -> int:
    """Checks one shard file; appends checksum mismatches to ``problems`` and raises for a file
    that cannot be checked further. Returns the bytes of tensor data read."""
    path = index.directory / file_name
    fd = open_shard(path)
    try:
        header = read_header(fd, path)
        expected = [name for name, file in index.weight_map.items() if file == file_name]
        entries = [check_header_entry(path, name, header.get(name), *pieces[name]) for name in expected]
        if len(header) != len(expected):
            extra = sorted(set(header) - set(expected))
            raise IndexMismatchError(f"{path}: holds tensors the index does not map to it: {extra[:3]}")
        scratch = memoryview(bytearray(max((e.end - e.begin for e in entries), default=0)))
        stored_bytes = 0
        for name, entry in zip(expected, entries):
            data = scratch[: entry.end - entry.begin]
            read_ranges(fd, path, [ReadRequest(entry.begin, data)])
            try:
                check_checksum(path, name, data, index.checksums[name])
            except CheckpointError as error:
                problems.append(error)
            stored_bytes += data.nbytes
        return stored_bytes
    finally:
        os.close(fd)


def verify_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> CheckpointIndex:
    """Checks a whole checkpoint (see ``check_checkpoint``) and raises the first problem.

    Returns:
        The index, when everything checks out.

    Raises:
        CheckpointNotFoundError, IncompatibleFormatError, CorruptCheckpointError,
        MissingShardFileError, IndexMismatchError, ChecksumMismatchError: the first problem found.
    """
    report = check_checkpoint(checkpoint_dir)
    if report.problems:
        raise report.problems[0]
    assert report.index is not None
    return report.index
