# pyre-strict
"""AsyncCheckpointer: the future's contract, staging copies, one save in flight, failures."""

import errno
import tempfile
import threading
import unittest
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from distributed_shampoo.checkpoint import (
    AsyncCheckpointer,
    AsyncSaveError,
    CheckpointFuture,
    CheckpointTimeoutError,
    CheckpointWriteError,
    DistributedSaveError,
    load_checkpoint,
    save_checkpoint,
    UnsupportedValueError,
    verify_checkpoint,
)
from distributed_shampoo.launch import run_on_ranks
from tests.checkpoint.faults import (
    DISK_FULL_REPORT,
    expect_failure_on_every_rank,
    fail_staging_copies,
    fill_disk_of_this_rank,
    restore_disk_of_this_rank,
)


def _big_state(value: float) -> dict[str, torch.Tensor]:
    """128 MiB in 32 tensors: long enough to write that the caller runs ahead of the writer."""
    return {f"t{i}": torch.full((1024, 1024), value + i) for i in range(32)}


def _held_until(release: threading.Event) -> Callable[[Path], None]:
    """An ``after_commit`` that keeps the save unfinished until ``release`` is set."""

    def hold(published: Path) -> None:
        release.wait(60)

    return hold


class AsyncSaveTest(unittest.TestCase):
    def setUp(self) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        self.root = Path(self._tmp.name)
        self.checkpointer = AsyncCheckpointer()

    def tearDown(self) -> None:
        self.checkpointer.close()
        self._tmp.cleanup()

    def test_wait_returns_the_published_directory_and_is_idempotent(self) -> None:
        state = {"w": torch.randn(10, 10), "step": 7}
        future = self.checkpointer.save_async(self.root / "a", state, metadata={"step": 7})
        self.assertIsInstance(future, CheckpointFuture)
        self.assertEqual(future.wait(), self.root / "a")
        self.assertTrue(future.done())
        self.assertEqual(future.wait(), self.root / "a")
        loaded = load_checkpoint(self.root / "a")
        self.assertTrue(torch.equal(loaded["w"], state["w"]))  # pyre-ignore[6]
        self.assertEqual(loaded["step"], 7)
        self.assertEqual(verify_checkpoint(self.root / "a").user_metadata, {"step": 7})

    def test_live_tensors_may_change_as_soon_as_save_async_returns(self) -> None:
        state = _big_state(0.0)
        future = self.checkpointer.save_async(self.root / "a", state)
        for tensor in state.values():
            tensor.fill_(-1.0)
        future.wait()
        loaded = load_checkpoint(self.root / "a")
        for i in range(32):
            self.assertTrue(torch.equal(loaded[f"t{i}"], torch.full((1024, 1024), float(i))), f"t{i}")  # pyre-ignore[6]

    def test_a_second_save_waits_for_the_first(self) -> None:
        release = threading.Event()
        first = self.checkpointer.save_async(self.root / "a", {"x": torch.zeros(2)}, after_commit=_held_until(release))
        self.assertFalse(first.done())
        threading.Timer(0.2, release.set).start()
        second = self.checkpointer.save_async(self.root / "b", {"x": torch.ones(2)})
        self.assertTrue(first.done())
        self.assertEqual(first.wait(), self.root / "a")
        self.assertEqual(second.wait(), self.root / "b")

    def test_staging_buffers_are_reused_by_the_next_save(self) -> None:
        self.checkpointer.save_async(self.root / "a", {"x": torch.zeros(4), "y": torch.zeros(2)}).wait()
        first = dict(self.checkpointer._buffers)
        self.checkpointer.save_async(self.root / "b", {"x": torch.ones(4), "y": torch.ones(3)}).wait()
        self.assertIs(self.checkpointer._buffers['["x"]'], first['["x"]'])
        self.assertIsNot(self.checkpointer._buffers['["y"]'], first['["y"]'])
        self.assertTrue(torch.equal(load_checkpoint(self.root / "b")["x"], torch.ones(4)))  # pyre-ignore[6]

    def test_planning_errors_raise_from_save_async(self) -> None:
        with self.assertRaisesRegex(UnsupportedValueError, r'\["bad"\]: cannot save a builtins.object'):
            self.checkpointer.save_async(self.root / "a", {"bad": object()})
        save_checkpoint(self.root / "b", {"x": torch.ones(1)})
        with self.assertRaisesRegex(Exception, "already exists"):
            self.checkpointer.save_async(self.root / "b", {"x": torch.zeros(1)})
        self.assertFalse((self.root / "a").exists())

    def test_background_failure_surfaces_from_wait_every_time(self) -> None:
        fill_disk_of_this_rank()
        try:
            future = self.checkpointer.save_async(self.root / "a", {"x": torch.ones(1)})
            for _ in range(2):
                with self.assertRaises(CheckpointWriteError) as raised:
                    future.wait()
                self.assertEqual(raised.exception.errno, errno.ENOSPC)
                self.assertEqual(str(raised.exception), f"[Errno 28] saving {self.root / 'a'} failed on rank 0: [Errno 28] No space left on device")
                self.assertIsInstance(raised.exception.__cause__, OSError)
        finally:
            restore_disk_of_this_rank()
        self.assertTrue(future.done())
        self.assertEqual(list(self.root.iterdir()), [])
        # The checkpointer goes on saving.
        self.assertEqual(self.checkpointer.save_async(self.root / "b", {"x": torch.ones(1)}).wait(), self.root / "b")

    def test_a_failing_after_commit_is_a_warning_the_save_succeeded(self) -> None:
        def fail(published: Path) -> None:
            raise OSError(errno.EIO, "rotation failed")

        future = self.checkpointer.save_async(self.root / "a", {"x": torch.ones(1)}, after_commit=fail)
        with self.assertWarnsRegex(UserWarning, r"after_commit of .*a failed: OSError: \[Errno 5\] rotation failed"):
            self.assertEqual(future.wait(), self.root / "a")
        self.assertTrue(torch.equal(load_checkpoint(self.root / "a")["x"], torch.ones(1)))  # pyre-ignore[6]

    def test_a_failed_staging_copy_fails_the_future_and_publishes_nothing(self) -> None:
        fail_staging_copies(self.checkpointer)
        future = self.checkpointer.save_async(self.root / "a", {"w": torch.ones(3)})
        with self.assertRaises(DistributedSaveError) as raised:
            future.wait()
        self.assertIsInstance(raised.exception.__cause__, MemoryError)
        self.assertEqual(list(self.root.iterdir()), [])

    def test_save_async_after_close_raises_and_writes_nothing(self) -> None:
        self.checkpointer.close()
        with self.assertRaisesRegex(AsyncSaveError, r"cannot save .*a: this AsyncCheckpointer is closed"):
            self.checkpointer.save_async(self.root / "a", {"w": torch.ones(3)})
        self.assertEqual(list(self.root.iterdir()), [])

    def test_wait_with_a_timeout(self) -> None:
        release = threading.Event()
        future = self.checkpointer.save_async(self.root / "a", {"x": torch.ones(2)}, after_commit=_held_until(release))
        with self.assertRaises(CheckpointTimeoutError) as raised:
            future.wait(timeout=0.0)
        self.assertIsInstance(raised.exception, TimeoutError)
        self.assertEqual(str(raised.exception), f"saving {self.root / 'a'} is still running after 0.0s")
        self.assertFalse(future.done())
        release.set()
        self.assertEqual(future.wait(timeout=60.0), self.root / "a")


def _async_save_while_training(rank: int, world_size: int, directory: str) -> None:
    """Each rank saves its own blocks and a replicated tensor, then keeps running collectives on
    the training group while the background thread writes and commits."""
    blocks = {f"block_{i}": torch.full((256, 256), float(i)) for i in range(rank, 12, world_size)}
    state = {"state": {"blocks": blocks, "step": torch.tensor(5)}}
    with AsyncCheckpointer() as checkpointer:
        future = checkpointer.save_async(directory, state, metadata={"world_size": world_size})
        total = torch.zeros(1)
        for block in blocks.values():
            block.add_(100.0)  # training goes on and changes the state
        for _ in range(50):
            value = torch.ones(1)
            dist.all_reduce(value)
            total += value
        assert float(total) == 50.0 * world_size, total
        future.wait()


def _load_blocks(rank: int, world_size: int, directory: str) -> None:
    blocks = {f"block_{i}": torch.zeros(256, 256) for i in range(rank, 12, world_size)}
    step = torch.tensor(0)
    load_checkpoint(directory, {"state": {"blocks": blocks, "step": step}})
    for name, block in blocks.items():
        assert torch.equal(block, torch.full((256, 256), float(name.split("_")[1]))), name
    assert int(step) == 5, step


def _async_save_with_disk_full_on_rank_1(rank: int, world_size: int, directory: str) -> None:
    if rank == 1:
        fill_disk_of_this_rank()
    with AsyncCheckpointer() as checkpointer:
        future = checkpointer.save_async(directory, {f"r{rank}": torch.ones(3)}, overwrite=True)
        expect_failure_on_every_rank(
            rank, 1, future.wait,
            lambda error: isinstance(error, CheckpointWriteError) and error.errno == errno.ENOSPC,
            DISK_FULL_REPORT,
        )


def _staging_copy_fails_on_rank_1(rank: int, world_size: int, directory: str) -> None:
    """Rank 1 runs out of memory while copying to its staging buffers: every rank's future fails."""
    with AsyncCheckpointer() as checkpointer:
        if rank == 1:
            fail_staging_copies(checkpointer)
        future = checkpointer.save_async(directory, {f"r{rank}": torch.ones(3)})
        expect_failure_on_every_rank(
            rank, 1, lambda: future.wait(timeout=60),
            lambda error: isinstance(error, DistributedSaveError) and isinstance(error.__cause__, MemoryError),
            "rank 1: MemoryError: out of pinned memory",
        )


class DistributedAsyncSaveTest(unittest.TestCase):
    def test_three_ranks_save_in_the_background_and_two_load(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            directory = str(Path(tmp, "ckpt"))
            run_on_ranks(3, _async_save_while_training, directory)
            self.assertEqual(verify_checkpoint(directory).world_size, 3)
            run_on_ranks(2, _load_blocks, directory)

    def test_a_failed_staging_copy_on_one_rank_fails_every_future_without_waiting(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            run_on_ranks(2, _staging_copy_fails_on_rank_1, str(Path(tmp, "ckpt")))
            self.assertEqual(list(Path(tmp).iterdir()), [])

    def test_failure_on_one_rank_fails_every_future_and_keeps_the_old_checkpoint(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp, "ckpt")
            save_checkpoint(directory, {"old": torch.arange(3.0)})
            run_on_ranks(2, _async_save_with_disk_full_on_rank_1, str(directory))
            self.assertTrue(torch.equal(load_checkpoint(directory)["old"], torch.arange(3.0)))  # pyre-ignore[6]
            self.assertEqual([p.name for p in Path(tmp).iterdir()], ["ckpt"])
