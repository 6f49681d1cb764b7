# pyre-strict
"""CheckpointManager: rotation, best-keeping, latest after a crash, cleanup, async saves."""

import signal
import tempfile
import unittest
import warnings
from pathlib import Path

import torch
from parameterized import parameterized

from distributed_shampoo.checkpoint import (
    CheckpointManager,
    ChecksumMismatchError,
    MissingKeyError,
    RetentionPolicy,
    UnsupportedValueError,
)
from distributed_shampoo.launch import run_on_ranks
from tests.checkpoint.faults import flip_last_byte, sigkill_while_staging


def _state(step: int) -> dict[str, object]:
    return {"w": torch.full((4, 4), float(step)), "step": step}


def _steps(manager: CheckpointManager) -> list[int]:
    return [info.step for info in manager.checkpoints()]


class ManagerTest(unittest.TestCase):
    def setUp(self) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        self.root = Path(self._tmp.name, "run")

    def tearDown(self) -> None:
        self._tmp.cleanup()

    def test_keeps_the_last_n(self) -> None:
        manager = CheckpointManager(self.root, RetentionPolicy(keep_last=2))
        for step in range(1, 6):
            future = manager.save(step, _state(step))
            self.assertTrue(future.done())
            self.assertEqual(future.wait(), self.root / f"step-{step:08d}")
        self.assertEqual(_steps(manager), [4, 5])
        self.assertEqual(sorted(p.name for p in self.root.iterdir()), ["step-00000004", "step-00000005"])

    @parameterized.expand([("min", [0.5, 0.2, 0.9, 0.4, 0.8], 2), ("max", [0.5, 0.2, 0.9, 0.4, 0.8], 3)])
    def test_keeps_the_best_by_a_metric(self, mode: str, losses: list[float], best_step: int) -> None:
        policy = RetentionPolicy(keep_last=1, best_metric="loss", mode="min" if mode == "min" else "max")
        manager = CheckpointManager(self.root, policy)
        for step, loss in enumerate(losses, start=1):
            manager.save(step, _state(step), metrics={"loss": loss})
        self.assertEqual(_steps(manager), [best_step, 5])
        best = manager.best()
        assert best is not None
        self.assertEqual((best.step, best.metrics), (best_step, {"loss": losses[best_step - 1]}))

    def test_preserved_checkpoints_survive_rotation(self) -> None:
        manager = CheckpointManager(self.root, RetentionPolicy(keep_last=1))
        for step in range(1, 5):
            manager.save(step, _state(step), preserve=step == 2)
        self.assertEqual(_steps(manager), [2, 4])
        self.assertEqual([info.preserved for info in manager.checkpoints()], [True, False])

    def test_latest_and_load_latest(self) -> None:
        manager = CheckpointManager(self.root)
        template = _state(0)
        self.assertIsNone(manager.latest())
        self.assertIsNone(manager.load_latest(template))
        self.assertTrue(torch.equal(template["w"], torch.zeros(4, 4)))  # pyre-ignore[6]
        for step in (10, 20, 30):
            manager.save(step, _state(step), metrics={"loss": step / 100})
        latest = manager.latest()
        assert latest is not None
        self.assertEqual((latest.step, latest.metrics, latest.path), (30, {"loss": 0.3}, self.root / "step-00000030"))
        loaded = manager.load_latest(template)
        assert loaded is not None
        self.assertEqual(loaded.step, 30)
        self.assertTrue(torch.equal(template["w"], torch.full((4, 4), 30.0)))  # pyre-ignore[6]
        self.assertEqual(template["step"], 30)

    def test_load_latest_skips_a_damaged_newest_checkpoint_with_a_warning(self) -> None:
        manager = CheckpointManager(self.root)
        manager.save(1, _state(1))
        manager.save(2, _state(2))
        flip_last_byte(next((self.root / "step-00000002").glob("*.safetensors")))
        self.assertFalse(manager.validate(self.root / "step-00000002"))
        self.assertTrue(manager.validate(self.root / "step-00000001"))
        template = _state(0)
        with self.assertWarnsRegex(UserWarning, r"step-00000002 does not load \(.*checksum.*\); trying an older one"):
            loaded = manager.load_latest(template)
        assert loaded is not None
        self.assertEqual(loaded.step, 1)
        self.assertTrue(torch.equal(template["w"], torch.ones(4, 4)))  # pyre-ignore[6]

    def test_load_latest_raises_when_every_checkpoint_is_damaged(self) -> None:
        manager = CheckpointManager(self.root)
        manager.save(1, _state(1))
        flip_last_byte(next((self.root / "step-00000001").glob("*.safetensors")))
        with self.assertWarns(UserWarning), self.assertRaises(ChecksumMismatchError):
            manager.load_latest(_state(0))

    def test_a_template_mismatch_is_not_hidden_by_falling_back(self) -> None:
        manager = CheckpointManager(self.root)
        manager.save(1, _state(1))
        manager.save(2, _state(2))
        with self.assertRaises(MissingKeyError):
            manager.load_latest({"other": torch.zeros(1)})

    def test_next_save_removes_leftovers_of_crashed_saves_only(self) -> None:
        manager = CheckpointManager(self.root)
        manager.save(1, _state(1))
        # A parked copy whose checkpoint exists is the leftover of a publish that completed.
        leftovers = [".step-00000002.incomplete-0123abcd", ".step-00000001.deleting-89ab", ".step-00000001.replaced-ff00"]
        unrelated = [".step-00000002.incomplete-notes.txt", "notes", ".cache"]
        for name in leftovers + unrelated[1:]:
            (self.root / name).mkdir()
            (self.root / name / "junk").write_bytes(b"x")
        (self.root / unrelated[0]).write_text("a file, not a directory")
        self.assertEqual(_steps(manager), [1])
        manager.save(2, _state(2))
        self.assertEqual(sorted(p.name for p in self.root.iterdir()), sorted(["step-00000001", "step-00000002"] + unrelated))

    def test_invalid_arguments(self) -> None:
        manager = CheckpointManager(self.root)
        with self.assertRaisesRegex(ValueError, "^CheckpointManager.save: step must be an int >= 0, got -1$"):
            manager.save(-1, _state(0))
        with self.assertRaisesRegex(UnsupportedValueError, r"^metric 'loss' must be a finite number, got nan$"):
            manager.save(1, _state(1), metrics={"loss": float("nan")})
        with self.assertRaisesRegex(ValueError, "^RetentionPolicy: keep_last must be >= 1 or None, got 0$"):
            RetentionPolicy(keep_last=0)
        with self.assertRaisesRegex(ValueError, "^RetentionPolicy: mode must be 'min' or 'max', got 'best'$"):
            RetentionPolicy(mode="best")  # pyre-ignore[6]: deliberately invalid
        manager.save(1, _state(1))
        with self.assertRaisesRegex(Exception, "already exists"):
            manager.save(1, _state(1))

    def test_async_saves_rotate_once_committed(self) -> None:
        with CheckpointManager(self.root, RetentionPolicy(keep_last=2), async_save=True) as manager:
            futures = []
            for step in range(1, 5):
                state = _state(step)
                futures.append(manager.save(step, state))
                state["w"].fill_(-1.0)  # pyre-ignore[16]: training changes the live state
            self.assertEqual(futures[-1].wait(), self.root / "step-00000004")
        self.assertEqual(_steps(manager), [3, 4])
        template = _state(0)
        manager.load_latest(template)
        self.assertTrue(torch.equal(template["w"], torch.full((4, 4), 4.0)))  # pyre-ignore[6]


def _save_steps_forever(root: str, started: str) -> None:
    """Saves ever larger steps of a 64 MiB state under ``root`` (killed by the test)."""
    manager = CheckpointManager(root, RetentionPolicy(keep_last=2))
    state = {f"t{i}": torch.full((256, 1024), float(i)) for i in range(64)}
    step = 0
    while True:
        step += 1
        state["step"] = torch.tensor(step)
        manager.save(step, state)
        if step == 2:
            Path(started).touch()


class KilledSaveTest(unittest.TestCase):
    def test_latest_after_sigkill_midway_is_the_previous_complete_checkpoint(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp, "run")
            started = root / "started"
            exit_code = sigkill_while_staging(_save_steps_forever, (str(root), str(started)), started, ".step-*.incomplete-*")
            self.assertEqual(exit_code, -signal.SIGKILL)
            manager = CheckpointManager(root, RetentionPolicy(keep_last=2))
            latest = manager.latest()
            assert latest is not None
            template: dict[str, object] = {f"t{i}": torch.zeros(256, 1024) for i in range(64)}
            step = torch.tensor(0)
            template["step"] = step
            loaded = manager.load_latest(template)
            assert loaded is not None
            self.assertEqual((loaded.step, int(step)), (latest.step, latest.step))
            self.assertTrue(manager.validate(latest.path))
            self.assertTrue(torch.equal(template["t63"], torch.full((256, 1024), 63.0)))  # pyre-ignore[6]
            manager.save(latest.step + 100, {"x": torch.ones(1)})
            self.assertEqual([p.name for p in root.iterdir() if p.name.startswith(".")], [])


def _manager_on_ranks(rank: int, world_size: int, root: str) -> None:
    with CheckpointManager(root, RetentionPolicy(keep_last=2), async_save=True) as manager:
        for step in range(1, 4):
            blocks = {f"block_{i}": torch.full((8,), float(step * 100 + i)) for i in range(rank, 6, world_size)}
            manager.save(step, {"blocks": blocks, "step": step}, metrics={"loss": 1.0 / step})


def _resume_on_ranks(rank: int, world_size: int, root: str) -> None:
    manager = CheckpointManager(root)
    blocks = {f"block_{i}": torch.zeros(8) for i in range(rank, 6, world_size)}
    template: dict[str, object] = {"blocks": blocks, "step": 0}
    loaded = manager.load_latest(template)
    assert loaded is not None and loaded.step == 3 and template["step"] == 3, (loaded, template["step"])
    for name, block in blocks.items():
        assert torch.equal(block, torch.full((8,), 300.0 + int(name.split("_")[1]))), name


def _resume_consistently(rank: int, world_size: int, root: str) -> None:
    """Rank 1's part of the newest checkpoint is damaged: every rank must resume from step 2."""
    manager = CheckpointManager(root)
    blocks = {f"block_{i}": torch.zeros(8) for i in range(rank, 6, world_size)}
    template: dict[str, object] = {"blocks": blocks, "step": 0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = manager.load_latest(template)
    assert loaded is not None and loaded.step == 2 and template["step"] == 2, (rank, loaded)
    assert any("rank 1: " in str(w.message) and "step-00000003 does not load" in str(w.message) for w in caught), caught
    for name, block in blocks.items():
        assert torch.equal(block, torch.full((8,), 200.0 + int(name.split("_")[1]))), name


class DistributedManagerTest(unittest.TestCase):
    def test_two_ranks_save_asynchronously_and_three_resume(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            root = str(Path(tmp, "run"))
            run_on_ranks(2, _manager_on_ranks, root)
            self.assertEqual(sorted(p.name for p in Path(root).iterdir()), ["step-00000002", "step-00000003"])
            run_on_ranks(3, _resume_on_ranks, root)

    def test_ranks_agree_on_the_checkpoint_when_one_rank_finds_its_part_damaged(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            root = str(Path(tmp, "run"))
            run_on_ranks(2, _manager_on_ranks, root)
            flip_last_byte(Path(root, "step-00000003", "optimizer-00002-of-00002.safetensors"))
            run_on_ranks(2, _resume_consistently, root)
