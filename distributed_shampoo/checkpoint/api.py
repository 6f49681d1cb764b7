# pyre-strict
"""The public entry points: save, load, read the index, verify."""

import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import overload, TypeVar

import torch
import torch.distributed as dist

from distributed_shampoo.checkpoint import plan_cache
from distributed_shampoo.checkpoint.collectives import DEFAULT_COLLECTIVE_TIMEOUT_S, Group
from distributed_shampoo.checkpoint.commit import (
    check_replaceable,
    check_target_name,
    new_save_id,
    publish,
    recover_interrupted_publish,
    staging_dir,
)
from distributed_shampoo.checkpoint.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointReplacedError,
    CheckpointWriteError,
    CorruptCheckpointError,
    DistributedSaveError,
    InconsistentStateError,
    MissingShardFileError,
    UnsupportedValueError,
)
from distributed_shampoo.checkpoint.format import (
    check_prefix,
    checksum,
    CheckpointIndex,
    DEFAULT_PREFIX,
    FIRST_VERSION_WITH_PARTS,
    index_document,
    index_file_name,
    manifest_file_name,
    seal,
    shard_file_name,
    shard_header_metadata,
)
from distributed_shampoo.checkpoint.gc_pause import gc_paused
from distributed_shampoo.checkpoint.index_parts import loader_files, read_partial_index, wants_loader_files
from distributed_shampoo.checkpoint.integrity import check_units, check_whole_and_pages, whole_unit
from distributed_shampoo.checkpoint.load import KeySelection, leaf_names, LoadPlan, normalise_keys, prepare
from distributed_shampoo.checkpoint.parse import check_header_matches, find_index_file, read_header, read_index, strict_json
from distributed_shampoo.checkpoint.plan import GlobalPlan, LocalPlan, plan_global, plan_local, StateDict
from distributed_shampoo.checkpoint.reader import open_regular, read_small_file
from distributed_shampoo.checkpoint.writer import start_safetensors, SyncingFile, tensor_bytes, write_new_file, WrittenFile
from distributed_shampoo.utils.shampoo_checkpoint_utils import Key

# A load that finds the checkpoint replaced under it (another job's overwrite) starts again this
# many times, reading the new index, before it gives up.
_REPLACED_RETRIES = 3


@dataclass(frozen=True)
class _Prepared:
    """What a rank reports after planning: its plan, or why it cannot save."""

    plan: LocalPlan | None
    error: CheckpointError | None
    save_id: str | None  # rank 0: the new save's identity (it also names the staging directory)
    repeats: str | None = None  # the remembered plan's generation, when ``plan`` holds only values


@dataclass(frozen=True)
class _Written:
    """What a rank reports after writing its file, or why it failed."""

    file: WrittenFile | None
    replicas: dict[str, str]  # checksums of the replicated tensors it holds but does not write
    error: CheckpointError | None


@gc_paused
def save_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    state_dict: StateDict,
    *,
    process_group: dist.ProcessGroup | None = None,
    metadata: Mapping[str, object] | None = None,
    prefix: str = DEFAULT_PREFIX,
    overwrite: bool = False,
    timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
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
            ``int``/``float``/``bool``/``str``/``None``, torch dtypes and this package's config
            dataclasses (stored as typed JSON, see ``values``). A plain tensor under the same key on
            several ranks is replicated state: it must be identical on all of them and is written
            once (by the lowest rank).
        process_group: The ranks saving together.
        metadata: JSON-serialisable values stored in the index under ``metadata.user``.
        prefix: The file name prefix: a plain file name (no separator, no leading dot).
        overwrite: Replace an existing checkpoint at ``checkpoint_dir``; it stays intact until the
            new one is complete. Only a checkpoint is replaced.
        timeout_s: How long a rank waits for the others at each collective step.

    Returns:
        The checkpoint directory.

    Raises:
        UnsupportedValueError: A leaf or key cannot be saved without pickling (names the key).
        InvalidArgumentError: The prefix or the directory's name cannot be used.
        CheckpointExistsError: ``checkpoint_dir`` exists and ``overwrite`` is false (also when
            another save created it first), or it is not a checkpoint.
        InconsistentStateError: Ranks disagree on a key (names it and the ranks).
        CheckpointWriteError: Writing failed on this rank.
        DistributedSaveError: Another rank failed or died.
        Every rank raises (the same error, or ``DistributedSaveError`` naming the rank that failed)
        and nothing is published.
    """
    group = Group.resolve(process_group, timeout_s)
    return finish_save(stage_save(group, checkpoint_dir, state_dict, metadata, prefix, overwrite), group)


@dataclass(frozen=True)
class StagedSave:
    """A save whose plan every rank agreed on; what is left is writing and committing.

    Attributes:
        target: The checkpoint directory to publish.
        staging: The hidden directory the files go to first.
        save_id: The save's identity, in the index and in every shard header.
        prefix: The file name prefix.
        plan: Every rank's writes and the index's layouts, on rank 0 (which commits); None on
            the other ranks.
        writes: This rank's ``(stored name, tensor)`` pairs, in write order.
        replicas: The replicated tensors this rank holds but another rank writes (their checksums
            are compared with the writer's).
        metadata: The user metadata for the index.
        overwrite: Whether an existing ``target`` may be replaced.
        failed: Why this rank cannot go on (its ``snapshot`` failed): ``finish_save`` then writes
            nothing and fails the save on every rank.
    """

    target: Path
    staging: Path
    save_id: str
    prefix: str
    plan: GlobalPlan | None
    writes: list[tuple[str, torch.Tensor]]
    replicas: list[tuple[str, torch.Tensor]]
    metadata: Mapping[str, object] | None
    overwrite: bool
    failed: BaseException | None = None


def _shared(error: BaseException, rank: int, target: Path) -> CheckpointError:
    """The form of a rank's failure that the other ranks raise."""
    if isinstance(error, CheckpointError):
        return error
    return DistributedSaveError(f"saving {target} failed, nothing was published: rank {rank}: {type(error).__name__}: {error}")


def _local(error: BaseException, rank: int, target: Path) -> BaseException:
    """The form of this rank's own failure that it raises: a ``CheckpointError`` (the original is
    its ``__cause__``), or an interrupt as it was."""
    if isinstance(error, CheckpointError) or not isinstance(error, Exception):
        return error
    if isinstance(error, OSError):
        typed: CheckpointError = CheckpointWriteError(error.errno, f"saving {target} failed on rank {rank}: {error}")
    else:
        typed = DistributedSaveError(f"saving {target} failed on rank {rank}: {type(error).__name__}: {error}")
    typed.__cause__ = error
    return typed


def stage_save(
    group: Group,
    checkpoint_dir: str | os.PathLike[str],
    state_dict: StateDict,
    metadata: Mapping[str, object] | None,
    prefix: str,
    overwrite: bool,
    snapshot: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> StagedSave:
    """The first half of a save: plan on every rank; rank 0 gathers the plans, decides who writes
    what, and sends each rank its decisions (two collectives on ``group``; four when a rank
    repeats a plan rank 0 has forgotten, see ``plan_cache``). A save whose plans repeat the last
    save's on ``group`` sends only the values and reuses that save's decisions.

    Rank 0 checks the target and creates the staging directory. A failure on any rank raises on
    every rank (the same error class), and the staging directory is removed.

    Args:
        snapshot: Called with this rank's tensors (stored name -> tensor) while the ranks exchange
            their plans, in this thread; what it returns (e.g. copies in staging buffers) is what
            the save writes. What it raises is kept in ``StagedSave.failed``.
    """
    target = Path(checkpoint_dir).absolute()
    prepared, local_plan_data, own_prepare_error = _prepare(group, target, state_dict, metadata, prefix, overwrite)
    staging = staging_dir(target, prepared.save_id[:16]) if prepared.save_id is not None else None
    global_plan: GlobalPlan | None = None
    tensors, failed = local_plan_data, None
    try:
        if snapshot is None:
            global_plan, decision, writes, replicas = _exchange_plans(group, prepared, target)
        else:  # the copies overlap the exchange: the collectives wait without the GIL
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="distributed_shampoo-plan") as pool:
                exchanged = pool.submit(_exchange_plans, group, prepared, target)
                try:
                    tensors = snapshot(local_plan_data)
                except BaseException as error:  # the other ranks are committed to the save: fail it everywhere
                    failed = error
                global_plan, decision, writes, replicas = exchanged.result()
        if decision.error is not None:
            own = decision.failed_rank == group.rank and own_prepare_error is not None
            raise own_prepare_error if own and own_prepare_error is not None else decision.error
    except BaseException as error:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise _local(error, group.rank, target)
    return StagedSave(
        target,
        staging_dir(target, decision.save_id[:16]),
        decision.save_id,
        prefix,
        global_plan,
        [(name, tensors[name]) for name in writes],
        [(name, tensors[name]) for name in replicas],
        metadata,
        overwrite,
        failed,
    )


def _exchange_plans(
    group: Group, prepared: "_Prepared", target: Path
) -> tuple[GlobalPlan | None, "_Decision", tuple[str, ...], tuple[str, ...]]:
    """Plans go to rank 0, which decides and sends each rank only its own part. A rank whose plan
    repeats its last save's sends only its values (``plan_cache``); if rank 0 cannot use that, it
    asks every rank for its whole plan.

    Returns:
        Rank 0's global plan (None elsewhere), this rank's decision, and the stored names this
        rank writes and the replicas it holds (empty if the decision is a failure).
    """
    offered = plan_cache.offer(group, prepared.plan) if prepared.plan is not None else None
    sent = prepared if offered is None else replace(prepared, plan=offered.plan, repeats=offered.repeats)
    global_plan, decision = _exchange(group, sent, target)
    if decision.resend:
        offered = None
        global_plan, decision = _exchange(group, prepared, target)
    if decision.error is not None or prepared.plan is None:
        return global_plan, decision, (), ()
    decided = None if decision.writes is None else (decision.writes, decision.replicas)
    writes, replicas = plan_cache.settle(group, offered, prepared.plan, decision.save_id, decided)
    return global_plan, decision, writes, replicas


def _exchange(group: Group, sent: "_Prepared", target: Path) -> tuple[GlobalPlan | None, "_Decision"]:
    everyone = group.gather_to_first(sent)
    global_plan: GlobalPlan | None = None
    decisions: list[_Decision] | None = None
    if everyone is not None:
        global_plan, decisions = _decide(everyone, target, group)
    return global_plan, group.scatter_from_first(decisions)


@dataclass(frozen=True)
class _Decision:
    """What rank 0 tells one rank after planning: the save's identity and what the rank writes,
    or the failure every rank raises.

    ``writes`` is None when rank 0 reused the remembered plan (every rank repeated it): the rank
    writes what it remembers. ``resend``: rank 0 needs every rank's whole
    plan (a rank repeated a plan rank 0 does not remember).
    """

    save_id: str
    writes: tuple[str, ...] | None
    replicas: tuple[str, ...]  # whole tensors this rank holds and another rank writes
    error: CheckpointError | None = None
    failed_rank: int | None = None
    resend: bool = False


def _decide(everyone: list[_Prepared], target: Path, group: Group) -> tuple[GlobalPlan | None, list[_Decision]]:
    """Rank 0: the global plan from every rank's plan, and each rank's decision."""
    save_id = everyone[0].save_id or ""
    failure = next(((rank, p.error) for rank, p in enumerate(everyone) if p.error is not None), None)
    if failure is None and not save_id:
        failure = (0, DistributedSaveError(f"saving {target}: rank 0 reported no save identity"))
    if failure is None:
        try:
            coordinated = plan_cache.coordinate(group, [(p.plan, p.repeats) for p in everyone if p.plan is not None], save_id)
        except BaseException as error:
            failure = (0, _shared(error, 0, target))
        else:
            if coordinated is None:
                return None, [_Decision(save_id, (), (), resend=True) for _ in everyone]
            plan = coordinated.plan
            if coordinated.reused:
                return plan, [_Decision(save_id, None, ()) for _ in everyone]
            return plan, [_Decision(save_id, w, r) for w, r in zip(plan.writes, plan.replicas)]
    rank, error = failure
    return None, [_Decision(save_id, (), (), error, rank) for _ in everyone]


def finish_save(staged: StagedSave, group: Group) -> Path:
    """The second half of a save: write this rank's file, then rank 0 commits the index.

    Three collectives on ``group`` (which must hold the same ranks, in the same order, as the
    group that staged the save): gather the written files' records on rank 0 (sent while the files
    are still being fsynced, so rank 0 encodes the index meanwhile), gather that every file is
    durable, broadcast the outcome. Nothing is published before every file is durable.

    Args:
        staged: What ``stage_save`` returned. If ``staged.failed``, this rank writes nothing and
            reports the failure, so that every rank fails the save instead of waiting.
        group: The ranks finishing the save together.

    Returns:
        The published checkpoint directory.

    Raises:
        CheckpointError: This rank failed (its own error), or another rank did (the same
            ``CheckpointError``, or ``DistributedSaveError`` naming it); nothing was published.
    """
    own_error: BaseException | None = None
    syncing: SyncingFile | None = None
    try:
        if staged.failed is not None:
            raise staged.failed
        syncing = start_safetensors(
            staged.staging / shard_file_name(staged.prefix, group.rank, group.world_size),
            staged.writes,
            shard_header_metadata(group.rank, group.world_size, staged.save_id),
        )
        mine = _Written(syncing.record, {name: checksum(tensor_bytes(tensor)) for name, tensor in staged.replicas}, None)
    except BaseException as error:  # reported to every rank so that none waits for this one
        own_error = error
        mine = _Written(None, {}, _shared(error, group.rank, staged.target))
    try:
        results = group.gather_to_first(mine)  # only rank 0 needs the records
        failure: CheckpointError | None = None
        commit: _IndexCommit | None = None
        if results is not None:
            failure = next((r.error for r in results if r.error is not None), None)
        if results is not None and failure is None and staged.plan is not None:
            try:
                _check_replicas(results)
                commit = encode_index(staged, staged.plan, group.world_size, [r.file for r in results if r.file is not None])
            except BaseException as error:
                own_error, failure = error, _shared(error, 0, staged.target)
        sync_error = _wait_durable(syncing)
        syncing = None
        if sync_error is not None and own_error is None:
            own_error = sync_error
        synced = group.gather_to_first(None if sync_error is None else _shared(sync_error, group.rank, staged.target))
        if synced is not None and failure is None:
            failure = next((error for error in synced if error is not None), None)
        if failure is None and commit is not None:
            try:
                publish_index(staged, commit)
            except BaseException as error:
                own_error, failure = error, _shared(error, 0, staged.target)
        failure = group.broadcast_from_first(failure)
    except DistributedSaveError as error:  # a rank died or hung
        if own_error is None and _is_published(staged):
            # Rank 0 published before the outcome could reach every rank: the save succeeded.
            warnings.warn(f"saving {staged.target}: {error}; the checkpoint was published", stacklevel=2)
            return staged.target
        failure = own_error = own_error or error
    finally:
        _wait_durable(syncing)  # a collective failed before this rank's file was waited for
    if group.rank == 0 and failure is not None:
        shutil.rmtree(staged.staging, ignore_errors=True)
    if own_error is not None:
        raise _local(own_error, group.rank, staged.target)
    if failure is not None:
        raise failure
    return staged.target


def _wait_durable(syncing: SyncingFile | None) -> BaseException | None:
    """Waits until this rank's file is durable; the fsync's error, if any."""
    if syncing is None:
        return None
    try:
        syncing.wait_durable()
    except BaseException as error:
        return error
    return None


def _is_published(staged: StagedSave) -> bool:
    """Whether the checkpoint at the target is the one this save wrote."""
    try:
        return read_index(staged.target).save_id == staged.save_id
    except CheckpointError:
        return False


def _check_replicas(results: list[_Written]) -> None:
    """Replicated plain tensors must be identical on every rank that holds them.

    Raises:
        InconsistentStateError: Names the key, the writing rank and the rank that differs.
    """
    writer: dict[str, tuple[int, str]] = {}
    for rank, result in enumerate(results):
        if result.file is not None:
            writer.update((name, (rank, digest)) for name, digest in result.file.checksums.items())
    for rank, result in enumerate(results):
        for name, digest in result.replicas.items():
            writer_rank, writer_digest = writer[name]
            if digest != writer_digest:
                raise InconsistentStateError(
                    f"{name}: rank {writer_rank} and rank {rank} hold different values (checksums {writer_digest} "
                    f"and {digest}); a plain tensor saved under one key on several ranks must be identical on all"
                )


def _prepare(
    group: Group,
    target: Path,
    state_dict: StateDict,
    metadata: Mapping[str, object] | None,
    prefix: str,
    overwrite: bool,
) -> tuple[_Prepared, dict[str, torch.Tensor], BaseException | None]:
    """Plans this rank's part; rank 0 also checks the target and creates the staging directory.

    Never raises: a failure is reported to every rank (so none waits in the collective) and
    returned as the third element, to be raised on this rank.
    """
    try:
        check_prefix(prefix)
        check_target_name(target)
        _check_metadata(metadata)
        plan, data = plan_local(state_dict)
        save_id = None
        if group.rank == 0:
            for done in recover_interrupted_publish(target):
                warnings.warn(f"save_checkpoint: {done}", stacklevel=4)
            if os.path.lexists(target):
                if not overwrite:
                    raise CheckpointExistsError(
                        f"{target} already exists; pass overwrite=True to replace it (it stays intact "
                        "until the new checkpoint is complete)"
                    )
                check_replaceable(target)
            save_id = new_save_id()
            target.parent.mkdir(parents=True, exist_ok=True)
            staging_dir(target, save_id[:16]).mkdir()
        return _Prepared(plan, None, save_id), data, None
    except BaseException as error:
        return _Prepared(None, _shared(error, group.rank, target), None), {}, error


def _check_metadata(metadata: Mapping[str, object] | None) -> None:
    try:
        json.dumps(dict(metadata or {}), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as error:
        raise UnsupportedValueError(f"metadata must be JSON-serialisable without NaN/inf: {error}") from None


@dataclass(frozen=True)
class _IndexCommit:
    """An encoded index, ready to be written into the staging directory and published."""

    index: CheckpointIndex
    contents: dict[str, bytes]  # file name -> content: the index first, then the loader's files


def commit_index(staged: StagedSave, plan: GlobalPlan, world_size: int, files: list[WrittenFile]) -> CheckpointIndex:
    """Writes the index of a staged save whose files are all durable (``files``, rank order),
    then publishes it (rank 0, which holds the global ``plan``): ``encode_index``, then
    ``publish_index``.

    Returns:
        The index written.

    Raises:
        CheckpointExistsError: The target appeared meanwhile and ``overwrite`` is false, or it is
            no longer a checkpoint.
    """
    commit = encode_index(staged, plan, world_size, files)
    publish_index(staged, commit)
    return commit.index


def encode_index(staged: StagedSave, plan: GlobalPlan, world_size: int, files: list[WrittenFile]) -> _IndexCommit:
    """The index of a staged save from its files' records (``files``, rank order), encoded with
    the loader's files if it is large; nothing is written."""
    weight_map: dict[str, str] = {}
    checksums: dict[str, str] = {}
    pages: dict[str, str] = {}
    for rank, written in enumerate(files):
        file_name = shard_file_name(staged.prefix, rank, world_size)
        weight_map.update((name, file_name) for name in written.checksums)
        checksums.update(written.checksums)
        pages.update((name, "".join(digests)) for name, digests in written.pages.items())
    index = CheckpointIndex(
        directory=staged.target,
        prefix=staged.prefix,
        world_size=world_size,
        total_size=sum(layout.nbytes for layout in plan.tensors.values()),
        weight_map=weight_map,
        tensors=plan.tensors,
        checksums=checksums,
        objects=plan.objects,
        containers=plan.containers,
        user_metadata=dict(staged.metadata or {}),
        save_id=staged.save_id,
        pages=pages,
        files={shard_file_name(staged.prefix, rank, world_size): w.record for rank, w in enumerate(files)},
    )
    document = index_document(index)
    text = seal(document).encode()
    contents = {index_file_name(staged.prefix): text}
    if wants_loader_files(len(text)):
        contents.update(loader_files(document))
    return _IndexCommit(index, contents)


def publish_index(staged: StagedSave, commit: _IndexCommit) -> None:
    """Writes an encoded index into the staging directory (each file fsynced) and publishes the
    checkpoint.

    Raises:
        CheckpointExistsError: As ``commit_index``.
    """
    for file_name, content in commit.contents.items():
        write_new_file(staged.staging / file_name, content)
    publish(staged.staging, staged.target, staged.save_id[:16], staged.overwrite)


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

    **All or nothing**: every file is checked (and with ``verify`` every byte to be copied is
    checked against its checksum) before the template changes, so a load that raises leaves the
    template as it was. A checkpoint replaced while it is read (another job's ``overwrite=True``)
    is read again from its new index.

    Args:
        checkpoint_dir: The checkpoint directory.
        state_dict: The template to fill, or ``None``.
        keys: Restricts loading to this top-level key, or to these top-level keys or key paths
            (prefixes of leaf paths).
        strict: Raise for template keys the checkpoint does not hold, and for selected ``keys``
            that match nothing; when false they are skipped (template values stay).
        verify: Check the checksum of every byte read (a piece read only in part: the pages it
            touches, or for a format 1 checkpoint the whole piece).

    Returns:
        The filled template, or the loaded state.

    Raises:
        CheckpointNotFoundError, IncompatibleFormatError, CorruptCheckpointError,
        ChecksumMismatchError, IndexMismatchError, MissingShardFileError, CheckpointReadError:
            the checkpoint is missing, damaged or unreadable.
        CheckpointReplacedError: It was replaced while reading, again and again.
        MissingKeyError: ``strict`` and the template or ``keys`` asks for keys the checkpoint lacks.
        TemplateMismatchError: A template leaf has another shape, dtype or kind of value, or
            cannot be filled (meta device, ``Partial`` DTensor, memory shared with another leaf).
        InvalidArgumentError: ``keys`` is not a key selection.
    """
    return _load(checkpoint_dir, state_dict, keys, strict, verify)


@gc_paused
def _load(
    checkpoint_dir: str | os.PathLike[str], state_dict: StateDict | None, keys: KeySelection | None, strict: bool, verify: bool
) -> StateDict:
    """``load_checkpoint``'s work, with the collector paused until its plan is freed."""
    plan, template = prepare_load(checkpoint_dir, state_dict, keys, strict, verify)
    plan.apply()
    return template


def prepare_load(
    checkpoint_dir: str | os.PathLike[str],
    state_dict: StateDict | None,
    keys: KeySelection | None,
    strict: bool,
    verify: bool,
) -> tuple[LoadPlan, StateDict]:
    """Phase 1 of ``load_checkpoint``: everything but changing the template (see
    ``load.prepare``), starting again from the index if the checkpoint is replaced meanwhile."""
    selection = normalise_keys(keys)
    leaves = leaf_names(state_dict, selection) if state_dict is not None else None
    attempts = 0
    while True:
        try:
            index = _index_for_load(Path(checkpoint_dir), leaves)
            return prepare(index, state_dict, selection, strict, verify, leaves)
        except CheckpointReplacedError:
            attempts += 1
            if attempts == _REPLACED_RETRIES:
                raise


def _index_for_load(directory: Path, leaves: Iterable[str] | None) -> CheckpointIndex:
    """What a load needs of the index: with a template, only the entries of its (selected)
    leaves, from the loader's files (format 3: the work is proportional to what is loaded); else
    the whole index."""
    if leaves is not None:
        index_path = find_index_file(directory)
        prefix = index_path.name[: -len(index_file_name(""))]
        names = list(leaves)
        partial = read_partial_index(directory, prefix, names)
        return partial if partial is not None else read_index(directory, wanted=names)
    return read_index(directory)


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

    Checks the index (schema, digest), that every shard file exists, is a regular file, is the
    one this save wrote and agrees with the index, and that every stored tensor and every page
    matches its checksum. Reads each file once, through one bounded scratch buffer.

    Args:
        checkpoint_dir: The checkpoint directory.
        progress: Called with ``(files checked, files)`` after each file.

    Returns:
        The report. It never raises: whatever goes wrong is a problem in the report.
    """
    try:
        index = read_index(checkpoint_dir)
    except Exception as error:
        return VerificationReport(None, (_as_problem(error, Path(checkpoint_dir)),), 0)
    problems: list[CheckpointError] = []
    files = index.shard_files()
    for rank, file_name in enumerate(files):
        path = index.directory / file_name
        try:
            _check_file(index, path, rank, problems)
        except Exception as error:
            problems.append(_as_problem(error, path))
        if progress is not None:
            progress(rank + 1, len(files))
    if index.format_version >= FIRST_VERSION_WITH_PARTS and _has_loader_files(index):
        _check_loader_files(index, problems)
    return VerificationReport(index, tuple(problems), len(files))


def _has_loader_files(index: CheckpointIndex) -> bool:
    """Whether the checkpoint has, or its save wrote, the loader's files (a manifest is there, or
    the index is as large as a save writes them for)."""
    directory = index.directory
    if (directory / manifest_file_name(index.prefix)).exists():
        return True
    try:
        return wants_loader_files((directory / index_file_name(index.prefix)).stat().st_size)
    except OSError:
        return True  # the index vanished after it was read: report the loader's files as missing too


def _check_loader_files(index: CheckpointIndex, problems: list[CheckpointError]) -> None:
    """The loader's files must hold exactly what the index derives (they are rebuilt and compared:
    the lookup table byte for byte, the JSON documents as parsed, whatever their key order)."""
    for file_name, expected in loader_files(index_document(index)).items():
        path = index.directory / file_name
        try:
            actual = read_small_file(path, "loader file", len(expected), MissingShardFileError)
            same = actual == expected or (
                file_name.endswith(".json") and strict_json(actual, path, "loader file") == json.loads(expected)
            )
        except CheckpointError as error:
            problems.append(error)
            continue
        if not same:
            problems.append(CorruptCheckpointError(f"{path}: does not match the index (a loader file was modified or damaged)"))


def _as_problem(error: Exception, path: Path) -> CheckpointError:
    if isinstance(error, CheckpointError):
        return error
    return CorruptCheckpointError(f"{path}: cannot be checked: {type(error).__name__}: {error}")


def _check_file(index: CheckpointIndex, path: Path, rank: int, problems: list[CheckpointError]) -> None:
    """Checks one shard file; appends checksum mismatches to ``problems`` and raises for a file
    that cannot be checked further."""
    fd = open_regular(path, "shard file", MissingShardFileError)
    try:
        header = read_header(fd, path, index, rank)
        check_header_matches(path, index, header)
        check_units(fd, path, [whole_unit(n, e, index) for n, e in header.items() if n not in index.pages], problems.append)
        for name, entry in header.items():
            if name in index.pages:
                check_whole_and_pages(fd, path, name, entry, index, problems.append)
    finally:
        os.close(fd)


def verify_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> CheckpointIndex:
    """Checks a whole checkpoint (see ``check_checkpoint``) and raises the first problem.

    Returns:
        The index, when everything checks out.

    Raises:
        CheckpointError: The first problem found (``CheckpointNotFoundError``,
            ``IncompatibleFormatError``, ``CorruptCheckpointError``, ``MissingShardFileError``,
            ``IndexMismatchError``, ``ChecksumMismatchError``, ...).
    """
    report = check_checkpoint(checkpoint_dir)
    if report.problems or report.index is None:
        raise report.problems[0]
    return report.index
