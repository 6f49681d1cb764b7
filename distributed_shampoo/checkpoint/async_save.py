# pyre-strict
"""Asynchronous saves: staging blocks training, writing and committing run in the background.

``save_async`` plans the save with the other ranks (collectives on the training process group, in
a thread it waits for) while it copies this rank's tensors into CPU staging buffers (pinned when
CUDA is available, reused by the next save of the same shapes), so training waits for the copies
and little else. It then returns a ``CheckpointFuture``;
a background thread writes the file, fsyncs it, and commits. The background thread talks to the
other ranks only through a gloo process group of its own, created with the checkpointer, so it
never issues a collective on the training process group.
"""

import os
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from distributed_shampoo.checkpoint.api import finish_save, stage_save, StagedSave
from distributed_shampoo.checkpoint.collectives import DEFAULT_COLLECTIVE_TIMEOUT_S, Group
from distributed_shampoo.checkpoint.errors import AsyncSaveError, CheckpointError, CheckpointTimeoutError
from distributed_shampoo.checkpoint.format import DEFAULT_PREFIX
from distributed_shampoo.checkpoint.gc_pause import gc_paused
from distributed_shampoo.checkpoint.plan import StateDict
from distributed_shampoo.utils.shampoo_utils import ParameterizeEnterExitContext


def _finish_and_notify(staged: StagedSave, group: Group, after_commit: Callable[[Path], None] | None) -> Path:
    published = finish_save(staged, group)
    if after_commit is not None:
        try:
            after_commit(published)
        except Exception as error:  # the checkpoint is published: the save has succeeded
            warnings.warn(f"after_commit of {published} failed: {type(error).__name__}: {error}", stacklevel=1)
    return published


class CheckpointFuture:
    """The outcome of one ``save_async``."""

    def __init__(self, future: "Future[Path]", target: Path) -> None:
        self._future = future
        self.checkpoint_dir: Path = target

    @classmethod
    def completed(cls, published: Path) -> "CheckpointFuture":
        """A future of a save that already succeeded (what a synchronous save returns)."""
        future: Future[Path] = Future()
        future.set_result(published)
        return cls(future, published)

    def done(self) -> bool:
        """True once the save has committed or failed (``wait`` then returns at once)."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> Path:
        """Blocks until the checkpoint is durable and published on every rank.

        Idempotent: later calls return the same path or raise the same error.

        Args:
            timeout: Seconds to wait at most; None waits as long as it takes.

        Returns:
            The published checkpoint directory.

        Raises:
            CheckpointError: The save failed (a ``CheckpointError`` as raised in the background,
                anything else wrapped in ``AsyncSaveError``); nothing was published.
            CheckpointTimeoutError: ``timeout`` passed first (the save goes on); also a
                ``TimeoutError``.
        """
        try:
            return self._future.result(timeout)
        except TimeoutError:
            raise CheckpointTimeoutError(f"saving {self.checkpoint_dir} is still running after {timeout}s") from None
        except CheckpointError:
            raise
        except Exception as error:
            raise AsyncSaveError(
                f"saving {self.checkpoint_dir} failed in the background: {type(error).__name__}: {error}"
            ) from error


class AsyncCheckpointer(ParameterizeEnterExitContext["AsyncCheckpointer"]):
    """Saves checkpoints in the background, one at a time; ``with`` closes it on exit.

    Construct it on every rank of the world (it creates a gloo process group for its background
    thread, which is a collective call), after ``torch.distributed`` is initialised, or in a
    single process without it.

    At most one save is in flight: ``save_async`` first waits for the previous save to finish
    (its outcome stays on its own future), so training blocks only if it saves faster than the
    disk writes.

    Args:
        process_group: The ranks that save together (default: the world).
        timeout_s: How long a rank waits for the others at each collective step of a save.
    """

    def __init__(
        self, process_group: dist.ProcessGroup | None = None, timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S
    ) -> None:
        super().__init__(self, lambda _: None, AsyncCheckpointer.close)  # ``with`` closes it
        self._group: Group = Group.resolve(process_group, timeout_s)
        self._background_group: Group = self._group
        if self._group.distributed:
            ranks = dist.get_process_group_ranks(process_group or dist.group.WORLD)
            self._background_group = Group.resolve(dist.new_group(ranks=ranks, backend="gloo"), timeout_s)
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distributed_shampoo-checkpoint")
        self._in_flight: CheckpointFuture | None = None
        self._buffers: dict[str, torch.Tensor] = {}

    def save_async(
        self,
        checkpoint_dir: str | os.PathLike[str],
        state_dict: StateDict,
        *,
        metadata: Mapping[str, object] | None = None,
        prefix: str = DEFAULT_PREFIX,
        overwrite: bool = False,
        after_commit: Callable[[Path], None] | None = None,
    ) -> CheckpointFuture:
        """Starts saving ``state_dict``, as ``save_checkpoint`` would, and returns once it is staged.

        Collective: every rank of the process group calls it. After it returns, the caller may
        modify or free the tensors of ``state_dict``: the save holds its own copies.

        Args:
            checkpoint_dir, state_dict, metadata, prefix, overwrite: As for ``save_checkpoint``.
            after_commit: Called in the background thread with the published directory, on every
                rank, once the save succeeded (e.g. to rotate old checkpoints); it must not issue
                collectives. Its failure is a warning: the checkpoint is already published.

        Returns:
            A future whose ``wait()`` returns the published directory.

        Raises:
            Whatever ``save_checkpoint`` raises while planning (invalid values, an existing target,
            ranks that disagree), on every rank and before anything is written. A failure while
            copying to the staging buffers (e.g. out of memory) fails the future on every rank.
            AsyncSaveError: The checkpointer is closed (nothing is written).
        """
        if self._closed:
            raise AsyncSaveError(f"cannot save {checkpoint_dir}: this AsyncCheckpointer is closed")
        self.wait()
        # The part of the save that blocks training.
        staged = gc_paused(stage_save)(self._group, checkpoint_dir, state_dict, metadata, prefix, overwrite, self._copy_to_staging_buffers)
        future = CheckpointFuture(
            self._executor.submit(_finish_and_notify, staged, self._background_group, after_commit),
            staged.target,
        )
        self._in_flight = future
        return future

    def _copy_to_staging_buffers(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies this rank's tensors into CPU buffers kept for the next save of the same layout."""
        pin = torch.cuda.is_available()
        buffers: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            buffer = self._buffers.get(name)
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
            buffer.copy_(tensor.detach(), non_blocking=pin)
            buffers[name] = buffer
        if pin:
            torch.cuda.synchronize()  # the non-blocking copies must land before training resumes
        self._buffers = buffers
        return buffers

    def wait(self) -> None:
        """Waits for the save in flight, if any, without raising its failure (see its future)."""
        in_flight = self._in_flight
        if in_flight is not None:
            try:
                in_flight.wait()
            except CheckpointError:
                pass

    def close(self) -> None:
        """Waits for the save in flight and stops the background thread; later saves raise."""
        self._closed = True
        self.wait()
        self._executor.shutdown(wait=True)
