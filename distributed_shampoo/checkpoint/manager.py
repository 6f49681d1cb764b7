# pyre-strict
"""``CheckpointManager``: numbered checkpoints under one root, rotation, best-keeping, resume.

Checkpoints are ``<root>/step-<step:08d>``, each a complete checkpoint of this library; the step,
the save's sequence number, the metrics and the "preserved" mark live in the index's user
metadata, so they are published atomically with the checkpoint. Half-written saves are hidden
staging directories, so they are never listed; the next save removes the leftovers of crashed
ones and puts back a checkpoint an interrupted publish had parked. A checkpoint found damaged is
renamed aside (``step-<step>.damaged-<token>``), never deleted.
"""

import functools
import math
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch.distributed as dist

from distributed_shampoo.checkpoint.api import prepare_load, read_checkpoint_index, save_checkpoint, verify_checkpoint
from distributed_shampoo.checkpoint.async_save import AsyncCheckpointer, CheckpointFuture
from distributed_shampoo.checkpoint.collectives import DEFAULT_COLLECTIVE_TIMEOUT_S, Group
from distributed_shampoo.checkpoint.commit import new_token, recover_interrupted_publish
from distributed_shampoo.checkpoint.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistributedSaveError,
    InconsistentStateError,
    InvalidArgumentError,
    MissingShardFileError,
    UnsupportedValueError,
)
from distributed_shampoo.checkpoint.format import check_prefix, DEFAULT_PREFIX
from distributed_shampoo.checkpoint.load import LoadPlan
from distributed_shampoo.checkpoint.gc_pause import gc_paused
from distributed_shampoo.checkpoint.plan import StateDict
from distributed_shampoo.utils.shampoo_utils import ParameterizeEnterExitContext

_STEP_DIR: re.Pattern[str] = re.compile(r"step-(\d{8,})")
# Hidden directories a save or a rotation leaves behind when it is killed (see commit.py).
_LEFTOVER: re.Pattern[str] = re.compile(r"\.step-\d{8,}\.(incomplete|deleting)-[0-9a-f]+")
_PARKED: re.Pattern[str] = re.compile(r"\.(step-\d{8,})\.replaced-[0-9a-f]+")


@dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints a manager keeps after each save.

    Attributes:
        keep_last: Keep the newest this many (by step); None keeps all.
        best_metric: Also keep the ``keep_best`` best checkpoints by this metric (None: no metric).
        mode: ``"min"`` or ``"max"``: which values of ``best_metric`` are best.
        keep_best: How many best checkpoints to keep.

    Checkpoints saved with ``preserve=True`` are always kept.

    Raises:
        InvalidArgumentError: ``keep_last`` or ``keep_best`` < 1, or an unknown mode.
    """

    keep_last: int | None = 3
    best_metric: str | None = None
    mode: Literal["min", "max"] = "min"
    keep_best: int = 1

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise InvalidArgumentError(f"RetentionPolicy: keep_last must be >= 1 or None, got {self.keep_last}")
        if self.keep_best < 1:
            raise InvalidArgumentError(f"RetentionPolicy: keep_best must be >= 1, got {self.keep_best}")
        if self.mode not in ("min", "max"):
            raise InvalidArgumentError(f"RetentionPolicy: mode must be 'min' or 'max', got {self.mode!r}")


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint under the manager's root.

    Attributes:
        step: The training step it was saved at.
        path: Its directory.
        metrics: The metrics saved with it.
        preserved: Saved with ``preserve=True`` (never rotated away).
        sequence: Its place in the order of saves under the root (1 for the first; 0 for
            checkpoints saved before the manager recorded it).
    """

    step: int
    path: Path
    metrics: dict[str, float]
    preserved: bool
    sequence: int = 0


class CheckpointManager(ParameterizeEnterExitContext["CheckpointManager"]):
    """Saves numbered checkpoints, keeps the ones the policy wants, and finds the one to resume;
    ``with`` closes it on exit.

    Every rank of the process group constructs it (with ``async_save``, every rank of the world:
    the ``AsyncCheckpointer`` it creates makes a process group) and calls ``save`` with its own
    state; rank 0 alone deletes (rotation and leftovers), and only once the previous save has
    finished on every rank, so nothing is removed while a rank may still be writing. One job per
    root.

    **Order.** Checkpoints are ordered by when they were saved, not by step: ``latest()`` is the
    one saved last and ``keep_last`` keeps the last saved. Saving a step older than existing ones
    (a rollback: resuming from step 100 after a bad step 200) makes it the latest; the abandoned
    run's later steps are older saves and rotate out like any other (a warning says so).

    **Retention never loses the last good checkpoint**: the checkpoint just saved is always kept,
    a checkpoint found damaged (by ``load_latest`` or an unreadable index) is renamed aside with a
    warning and not counted as kept, and trouble while deleting is a warning, never a failed save.

    Args:
        root: The directory holding the checkpoints (created on first save).
        retention: What to keep after each save.
        async_save: Save in the background (``save`` returns after staging) instead of in the
            caller's thread.
        process_group: The ranks that save together (default: the world).
        prefix: The checkpoints' file name prefix (a plain file name).
        timeout_s: How long a rank waits for the others at each collective step.

    Raises:
        InvalidArgumentError: The prefix is not a plain file name.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        retention: RetentionPolicy | None = None,
        *,
        async_save: bool = False,
        process_group: dist.ProcessGroup | None = None,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
    ) -> None:
        super().__init__(self, lambda _: None, CheckpointManager.close)  # ``with`` closes it
        self.root: Path = Path(root).absolute()
        self.retention: RetentionPolicy = retention or RetentionPolicy()
        self._process_group = process_group
        self._group: Group = Group.resolve(process_group, timeout_s)
        self._rank: int = self._group.rank
        self._prefix: str = check_prefix(prefix)
        self._timeout_s = timeout_s
        self._checkpointer: AsyncCheckpointer | None = AsyncCheckpointer(process_group, timeout_s) if async_save else None

    def path_for(self, step: int) -> Path:
        """The directory of the checkpoint of ``step``."""
        return self.root / f"step-{step:08d}"

    def save(
        self,
        step: int,
        state_dict: StateDict,
        metrics: Mapping[str, float] | None = None,
        *,
        preserve: bool = False,
    ) -> CheckpointFuture:
        """Saves ``state_dict`` as the checkpoint of ``step``, then applies the retention policy.

        Collective: every rank calls it. Waits for the previous save first; rank 0 then removes
        the leftovers of crashed saves.

        Args:
            step: The training step (>= 0); its checkpoint must not exist yet.
            state_dict: What to save (see ``save_checkpoint``).
            metrics: Numbers to keep with the checkpoint (e.g. ``{"loss": 0.3}``) for
                ``best_metric`` and ``CheckpointInfo.metrics``.
            preserve: Never delete this checkpoint in rotation.

        Returns:
            A future: already done for a synchronous save, otherwise done once the checkpoint is
            published and the policy applied.

        Raises:
            InvalidArgumentError: A negative step; UnsupportedValueError: metrics that are not
                numbers. Whatever ``save_checkpoint`` raises (a synchronous save raises here, an
                asynchronous one from ``wait()`` unless planning failed). A save raises only if
                its checkpoint was not published.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InvalidArgumentError(f"CheckpointManager.save: step must be an int >= 0, got {step!r}")
        metric_values = _check_metrics(metrics)
        self.wait()
        sequence = 0  # the index records rank 0's metadata: only rank 0 lists the root
        if self._rank == 0:
            self._remove_leftovers()
            existing = self.checkpoints()
            newest = max((info.step for info in existing), default=-1)
            if step < newest:
                warnings.warn(
                    f"CheckpointManager: saving step {step} after step {newest}: step {step} becomes the latest "
                    "checkpoint (a rollback); later steps are older saves now and rotate out as such",
                    stacklevel=2,
                )
            sequence = 1 + max((info.sequence for info in existing), default=0)
        metadata = {"step": step, "sequence": sequence, "metrics": metric_values, "preserved": preserve}
        target = self.path_for(step)
        after_commit = functools.partial(self._after_commit, step)
        if self._checkpointer is not None:
            return self._checkpointer.save_async(
                target, state_dict, metadata=metadata, prefix=self._prefix, after_commit=after_commit
            )
        published = save_checkpoint(
            target, state_dict, process_group=self._process_group, metadata=metadata, prefix=self._prefix,
            timeout_s=self._timeout_s,
        )
        after_commit(published)
        return CheckpointFuture.completed(published)

    def _after_commit(self, step: int, published: Path) -> None:
        if self._rank == 0:
            try:
                self.apply_retention(just_saved=step)
            except Exception as error:  # the checkpoint is published: the save has succeeded
                warnings.warn(f"CheckpointManager: retention after saving {published} failed: {error}", stacklevel=2)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every complete checkpoint under the root, oldest step first.

        A directory counts once its index reads back (a save publishes it complete); one whose
        index is unreadable is skipped with a warning.
        """
        return self._scan()[0]

    def _scan(self) -> tuple[list[CheckpointInfo], list[Path]]:
        """The complete checkpoints in save order, and the step directories whose index is damaged."""
        if not self.root.is_dir():
            return [], []
        found: list[CheckpointInfo] = []
        damaged: list[Path] = []
        for entry in self.root.iterdir():
            match = _STEP_DIR.fullmatch(entry.name)
            if match is None or not entry.is_dir():
                continue
            try:
                user = read_checkpoint_index(entry).user_metadata
            except CheckpointError as error:
                warnings.warn(f"CheckpointManager: skipping {entry}: {error}", stacklevel=3)
                if isinstance(error, (CorruptCheckpointError, CheckpointNotFoundError)):
                    damaged.append(entry)
                continue
            metrics = user.get("metrics")
            sequence = user.get("sequence")
            found.append(
                CheckpointInfo(
                    step=int(match.group(1)),
                    path=entry,
                    metrics={str(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
                    if isinstance(metrics, dict)
                    else {},
                    preserved=user.get("preserved") is True,
                    sequence=sequence if type(sequence) is int else 0,
                )
            )
        return sorted(found, key=lambda info: (info.sequence, info.step)), damaged

    def latest(self) -> CheckpointInfo | None:
        """The complete checkpoint saved last, or None."""
        checkpoints = self.checkpoints()
        return checkpoints[-1] if checkpoints else None

    def best(self) -> CheckpointInfo | None:
        """The best checkpoint by ``retention.best_metric``, or None (no metric, or no values)."""
        ranked = self._ranked_by_metric(self.checkpoints())
        return ranked[0] if ranked else None

    @gc_paused
    def load_latest(self, state_dict: StateDict, *, strict: bool = True, verify: bool = True) -> CheckpointInfo | None:
        """Fills ``state_dict`` in place from the newest checkpoint that loads on every rank.

        Collective when distributed (every rank of the process group calls it), so that all ranks
        resume from the same step. Each checkpoint is tried in two phases: every rank checks its
        part without touching the template, the ranks exchange the outcomes, and only if every
        rank's part is intact do they all fill their templates. A checkpoint damaged on any rank
        is skipped on all of them with a warning, renamed aside (rank 0), and the next older one
        is tried; so the template ends up holding exactly the checkpoint returned.

        Returns:
            The checkpoint loaded, or None if there is none (the template is untouched).

        Raises:
            InconsistentStateError: The ranks see different checkpoints under the root.
            CheckpointError: Every checkpoint failed to load (the newest one's error), or a
                failure that an older checkpoint would not cure (``MissingKeyError``,
                ``TemplateMismatchError``, an unreadable file) on some rank: that rank raises its
                own error, the others a ``CheckpointError`` naming it. The template is untouched.
        """
        group = self._group
        candidates = list(reversed(self.checkpoints()))
        seen = group.all_gather([info.step for info in candidates])
        if any(steps != seen[0] for steps in seen):
            raise InconsistentStateError(
                f"the ranks see different checkpoints under {self.root}: "
                + ", ".join(f"rank {rank}: steps {steps}" for rank, steps in enumerate(seen))
            )
        first_error: CheckpointError | None = None
        for info in candidates:
            plan: LoadPlan | None = None
            own_error: BaseException | None = None
            try:
                plan = prepare_load(info.path, state_dict, None, strict, verify)[0]
            except BaseException as error:  # every failure is reported, so no rank waits for this one
                own_error = error
            failures = self._exchange_failures(own_error)
            if not failures:
                return self._apply_everywhere(info, plan)
            if plan is not None:
                plan.close()
            details = "; ".join(message for _, message in failures)
            if not all(damage for damage, _ in failures):
                if own_error is not None:
                    raise own_error
                raise CheckpointError(f"loading {info.path} failed on another rank: {details}")
            warnings.warn(f"CheckpointManager: {info.path} does not load ({details}); trying an older one", stacklevel=2)
            if self._rank == 0:
                self._quarantine(info.path)
            error = own_error if isinstance(own_error, CheckpointError) else None
            first_error = first_error or error or CorruptCheckpointError(f"{info.path} is damaged: {details}")
        if first_error is not None:
            raise first_error
        return None

    def _exchange_failures(self, own_error: BaseException | None) -> list[tuple[bool, str]]:
        """Every rank's failure as ``(is damage, message)``."""
        mine = None if own_error is None else (_is_damage(own_error), f"rank {self._rank}: {type(own_error).__name__}: {own_error}")
        return [outcome for outcome in self._group.all_gather(mine) if outcome is not None]

    def _apply_everywhere(self, info: CheckpointInfo, plan: LoadPlan | None) -> CheckpointInfo:
        own_error: BaseException | None = None
        try:
            if plan is not None:
                plan.apply()
        except BaseException as error:
            own_error = error
        failures = self._exchange_failures(own_error)
        if own_error is not None:
            raise own_error
        if failures:
            raise DistributedSaveError(f"loading {info.path} failed on another rank: {'; '.join(m for _, m in failures)}")
        return info

    def validate(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` is a complete checkpoint whose files all match their checksums."""
        try:
            verify_checkpoint(path)
        except CheckpointError:
            return False
        return True

    def apply_retention(self, just_saved: int | None = None) -> list[Path]:
        """Deletes the checkpoints the policy does not keep (call on one rank only).

        The checkpoint of ``just_saved`` is always kept; step directories whose index is damaged
        are renamed aside (with a warning), not counted as kept. A deletion that fails is a
        warning.

        Returns:
            The deleted directories.
        """
        checkpoints, damaged = self._scan()
        for path in damaged:
            self._quarantine(path)
        keep = {info.step for info in checkpoints if info.preserved or info.step == just_saved}
        if self.retention.keep_last is None:
            keep.update(info.step for info in checkpoints)
        else:
            keep.update(info.step for info in checkpoints[-self.retention.keep_last :])
        keep.update(info.step for info in self._ranked_by_metric(checkpoints)[: self.retention.keep_best])
        deleted: list[Path] = []
        for info in checkpoints:
            if info.step not in keep:
                try:
                    _delete(info.path)
                    deleted.append(info.path)
                except OSError as error:
                    warnings.warn(f"CheckpointManager: could not delete {info.path}: {error}", stacklevel=2)
        return deleted

    def _quarantine(self, path: Path) -> None:
        """Renames a damaged checkpoint aside, out of the listing, so retention cannot count it as
        kept and nothing deletes it; a failure is a warning."""
        aside = path.parent / f"{path.name}.damaged-{new_token()}"
        try:
            os.rename(path, aside)
        except OSError as error:
            warnings.warn(f"CheckpointManager: {path} is damaged and could not be renamed aside: {error}", stacklevel=3)
            return
        warnings.warn(f"CheckpointManager: {path} is damaged; renamed it to {aside} (not deleted)", stacklevel=3)

    def _ranked_by_metric(self, checkpoints: list[CheckpointInfo]) -> list[CheckpointInfo]:
        metric = self.retention.best_metric
        if metric is None:
            return []
        scored = [info for info in checkpoints if metric in info.metrics]
        sign = 1.0 if self.retention.mode == "min" else -1.0
        return sorted(scored, key=lambda info: (sign * info.metrics[metric], -info.step))

    def _remove_leftovers(self) -> None:
        """Puts back checkpoints parked by an interrupted publish, then deletes the staging and
        deleting directories of killed saves and rotations."""
        if not self.root.is_dir():
            return
        for entry in list(self.root.iterdir()):
            parked = _PARKED.fullmatch(entry.name)
            if parked is not None:
                for done in recover_interrupted_publish(self.root / parked.group(1)):
                    warnings.warn(f"CheckpointManager: {done}", stacklevel=3)
        for entry in self.root.iterdir():
            if _LEFTOVER.fullmatch(entry.name) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)

    def wait(self) -> None:
        """Waits for the save in flight, if any (its failure stays on its future)."""
        if self._checkpointer is not None:
            self._checkpointer.wait()

    def close(self) -> None:
        """Waits for the save in flight and stops the background thread."""
        if self._checkpointer is not None:
            self._checkpointer.close()


def _check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    checked: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UnsupportedValueError(f"metric {name!r} must be a finite number, got {value!r}")
        checked[str(name)] = float(value)
    return checked


def _is_damage(error: BaseException) -> bool:
    """Whether a load failed because of the checkpoint's files, so an older one may load."""
    return isinstance(error, (CorruptCheckpointError, MissingShardFileError, CheckpointNotFoundError))


def _delete(path: Path) -> None:
    """Removes a checkpoint so that it disappears at once: rename to a hidden name, then delete."""
    hidden = path.parent / f".{path.name}.deleting-{new_token()}"
    os.rename(path, hidden)
    shutil.rmtree(hidden)
