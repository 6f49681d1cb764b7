# pyre-strict
"""``CheckpointManager``: numbered checkpoints under one root, rotation, best-keeping, resume.

Checkpoints are ``<root>/step-<step:08d>``, each a complete checkpoint of this library; the step,
the metrics and the "preserved" mark live in the index's user metadata, so they are published
atomically with the checkpoint. Half-written saves are hidden staging directories, so they are
never listed; the next save removes the leftovers of crashed ones.
"""

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

from distributed_shampoo.checkpoint.api import load_checkpoint, read_checkpoint_index, save_checkpoint, verify_checkpoint
from distributed_shampoo.checkpoint.async_save import AsyncCheckpointer, CheckpointFuture
from distributed_shampoo.checkpoint.collectives import Group
from distributed_shampoo.checkpoint.commit import new_token
from distributed_shampoo.checkpoint.errors import (
    CheckpointError,
    CorruptCheckpointError,
    InconsistentStateError,
    MissingKeyError,
    TemplateMismatchError,
    UnsupportedValueError,
)
from distributed_shampoo.checkpoint.format import DEFAULT_PREFIX
from distributed_shampoo.checkpoint.plan import StateDict
from distributed_shampoo.utils.shampoo_utils import ParameterizeEnterExitContext

_STEP_DIR: re.Pattern[str] = re.compile(r"step-(\d{8,})")
# Hidden directories a save or a rotation leaves behind when it is killed (see commit.py).
_LEFTOVER: re.Pattern[str] = re.compile(r"\.step-\d{8,}\.(incomplete|replaced|deleting)-[0-9a-f]+")


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
        ValueError: ``keep_last`` or ``keep_best`` < 1, or an unknown mode.
    """

    keep_last: int | None = 3
    best_metric: str | None = None
    mode: Literal["min", "max"] = "min"
    keep_best: int = 1

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"RetentionPolicy: keep_last must be >= 1 or None, got {self.keep_last}")
        if self.keep_best < 1:
            raise ValueError(f"RetentionPolicy: keep_best must be >= 1, got {self.keep_best}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"RetentionPolicy: mode must be 'min' or 'max', got {self.mode!r}")


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint under the manager's root.

    Attributes:
        step: The training step it was saved at.
        path: Its directory.
        metrics: The metrics saved with it.
        preserved: Saved with ``preserve=True`` (never rotated away).
    """

    step: int
    path: Path
    metrics: dict[str, float]
    preserved: bool


class CheckpointManager(ParameterizeEnterExitContext["CheckpointManager"]):
    """Saves numbered checkpoints, keeps the ones the policy wants, and finds the one to resume;
    ``with`` closes it on exit.

    Every rank of the process group constructs it (with ``async_save``, every rank of the world:
    the ``AsyncCheckpointer`` it creates makes a process group) and calls ``save`` with its own
    state; rank 0
    alone deletes (rotation and leftovers), and only once the previous save has finished on every
    rank, so nothing is removed while a rank may still be writing. One job per root.

    Args:
        root: The directory holding the checkpoints (created on first save).
        retention: What to keep after each save.
        async_save: Save in the background (``save`` returns after staging) instead of in the
            caller's thread.
        process_group: The ranks that save together (default: the world).
        prefix: The checkpoints' file name prefix.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        retention: RetentionPolicy | None = None,
        *,
        async_save: bool = False,
        process_group: dist.ProcessGroup | None = None,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        super().__init__(self, lambda _: None, CheckpointManager.close)  # ``with`` closes it
        self.root: Path = Path(root).absolute()
        self.retention: RetentionPolicy = retention or RetentionPolicy()
        self._process_group = process_group
        self._rank: int = Group.resolve(process_group).rank
        self._prefix = prefix
        self._checkpointer: AsyncCheckpointer | None = AsyncCheckpointer(process_group) if async_save else None

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
            ValueError: A negative step; UnsupportedValueError: metrics that are not numbers.
            Whatever ``save_checkpoint`` raises (a synchronous save raises here, an asynchronous
            one from ``wait()`` unless planning failed).
        """
        if step < 0:
            raise ValueError(f"CheckpointManager.save: step must be >= 0, got {step}")
        metric_values = _check_metrics(metrics)
        self.wait()
        if self._rank == 0:
            self._remove_leftovers()
        metadata = {"step": step, "metrics": metric_values, "preserved": preserve}
        target = self.path_for(step)
        if self._checkpointer is not None:
            return self._checkpointer.save_async(
                target, state_dict, metadata=metadata, prefix=self._prefix, after_commit=self._after_commit
            )
        published = save_checkpoint(target, state_dict, process_group=self._process_group, metadata=metadata, prefix=self._prefix)
        self._after_commit(published)
        return CheckpointFuture.completed(published)

    def _after_commit(self, published: Path) -> None:
        if self._rank == 0:
            self.apply_retention()

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every complete checkpoint under the root, oldest step first.

        A directory counts once its index reads back (a save publishes it complete); one whose
        index is unreadable is skipped with a warning.
        """
        if not self.root.is_dir():
            return []
        found: list[CheckpointInfo] = []
        for entry in self.root.iterdir():
            match = _STEP_DIR.fullmatch(entry.name)
            if match is None or not entry.is_dir():
                continue
            try:
                user = read_checkpoint_index(entry).user_metadata
            except CheckpointError as error:
                warnings.warn(f"CheckpointManager: skipping {entry}: {error}", stacklevel=2)
                continue
            metrics = user.get("metrics")
            found.append(
                CheckpointInfo(
                    step=int(match.group(1)),
                    path=entry,
                    metrics={str(k): float(v) for k, v in metrics.items()} if isinstance(metrics, dict) else {},
                    preserved=user.get("preserved") is True,
                )
            )
        return sorted(found, key=lambda info: info.step)

    def latest(self) -> CheckpointInfo | None:
        """The complete checkpoint with the highest step, or None."""
        checkpoints = self.checkpoints()
        return checkpoints[-1] if checkpoints else None

    def best(self) -> CheckpointInfo | None:
        """The best checkpoint by ``retention.best_metric``, or None (no metric, or no values)."""
        ranked = self._ranked_by_metric(self.checkpoints())
        return ranked[0] if ranked else None

    def load_latest(self, state_dict: StateDict, *, strict: bool = True, verify: bool = True) -> CheckpointInfo | None:
        """Fills ``state_dict`` in place from the newest checkpoint that loads on every rank.

        Collective when distributed (every rank of the process group calls it), so that all ranks
        resume from the same step: a checkpoint that turns out damaged on any rank (each rank reads
        only its own part) is skipped on all of them with a warning naming the errors, and the
        next older one is tried.

        Returns:
            The checkpoint loaded, or None if there is none (the template is untouched).

        Raises:
            InconsistentStateError: The ranks see different checkpoints under the root.
            CheckpointError: Every checkpoint failed to load (the newest one's error), or the
                template does not match on some rank (``MissingKeyError``,
                ``TemplateMismatchError`` on that rank, ``CheckpointError`` on the others: trying
                older checkpoints would not help).
        """
        group = Group.resolve(self._process_group)
        candidates = list(reversed(self.checkpoints()))
        seen = group.all_gather([info.step for info in candidates])
        if any(steps != seen[0] for steps in seen):
            raise InconsistentStateError(
                f"the ranks see different checkpoints under {self.root}: "
                + ", ".join(f"rank {rank}: steps {steps}" for rank, steps in enumerate(seen))
            )
        first_error: CheckpointError | None = None
        for info in candidates:
            own_error: CheckpointError | None = None
            try:
                load_checkpoint(info.path, state_dict, strict=strict, verify=verify)
            except CheckpointError as error:
                own_error = error
            outcomes = group.all_gather(
                None if own_error is None else (_is_damage(own_error), f"rank {group.rank}: {own_error}")
            )
            failures = [outcome for outcome in outcomes if outcome is not None]
            if not failures:
                return info
            details = "; ".join(message for _, message in failures)
            if not all(damage for damage, _ in failures):
                raise own_error or CheckpointError(f"loading {info.path} failed on another rank: {details}")
            warnings.warn(f"CheckpointManager: {info.path} does not load ({details}); trying an older one", stacklevel=2)
            first_error = first_error or own_error or CorruptCheckpointError(f"{info.path} is damaged: {details}")
        if first_error is not None:
            raise first_error
        return None

    def validate(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` is a complete checkpoint whose files all match their checksums."""
        try:
            verify_checkpoint(path)
        except CheckpointError:
            return False
        return True

    def apply_retention(self) -> list[Path]:
        """Deletes the checkpoints the policy does not keep (call on one rank only).

        Returns:
            The deleted directories.
        """
        checkpoints = self.checkpoints()
        keep = {info.step for info in checkpoints if info.preserved}
        if self.retention.keep_last is None:
            keep.update(info.step for info in checkpoints)
        else:
            keep.update(info.step for info in checkpoints[-self.retention.keep_last :])
        keep.update(info.step for info in self._ranked_by_metric(checkpoints)[: self.retention.keep_best])
        deleted = [info.path for info in checkpoints if info.step not in keep]
        for path in deleted:
            _delete(path)
        return deleted

    def _ranked_by_metric(self, checkpoints: list[CheckpointInfo]) -> list[CheckpointInfo]:
        metric = self.retention.best_metric
        if metric is None:
            return []
        scored = [info for info in checkpoints if metric in info.metrics]
        sign = 1.0 if self.retention.mode == "min" else -1.0
        return sorted(scored, key=lambda info: (sign * info.metrics[metric], -info.step))

    def _remove_leftovers(self) -> None:
        if not self.root.is_dir():
            return
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


def _is_damage(error: CheckpointError) -> bool:
    """Whether a load failed because of the checkpoint's files (an older one may load)."""
    return not isinstance(error, (MissingKeyError, TemplateMismatchError))


def _delete(path: Path) -> None:
    """Removes a checkpoint so that it disappears at once: rename to a hidden name, then delete."""
    hidden = path.parent / f".{path.name}.deleting-{new_token()}"
    os.rename(path, hidden)
    shutil.rmtree(hidden)
