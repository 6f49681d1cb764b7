# pyre-strict
"""What loads is what was saved, and the last good checkpoint survives: single-process cases.

One test class per promise of docs/checkpoint.md "What is guaranteed"; the multi-rank promises
are in test_trust_distributed.py.
"""

import contextlib
import errno
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

from distributed_shampoo.checkpoint import (
    check_checkpoint,
    CheckpointExistsError,
    CheckpointManager,
    CheckpointReplacedError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    InvalidArgumentError,
    load_checkpoint,
    MissingKeyError,
    RetentionPolicy,
    save_checkpoint,
    TemplateMismatchError,
    verify_checkpoint,
)
from distributed_shampoo.checkpoint import commit, manager as manager_module
from distributed_shampoo.checkpoint.cli import main
from distributed_shampoo.checkpoint.load import prepare
from distributed_shampoo.checkpoint.parse import read_index
from tests.checkpoint.faults import flip_last_byte
from tests.checkpoint.scratch import ScratchDirTest

_V1: Path = Path(__file__).parent / "data" / "format_v1"


def _v1_expected() -> dict[str, object]:
    """What tests/checkpoint/data/format_v1 holds (see its README)."""
    return {
        "model": {"w": torch.arange(15.0).reshape(5, 3), "r": torch.arange(100.0, 104.0).reshape(2, 2)},
        "optim": {
            "state": {"w": {f"block_{r}": {"momentum": torch.full((3,), float(r + 1), dtype=torch.float64)} for r in (0, 1)}},
            "param_groups": [{"lr": 0.125, "betas": (0.9, 0.999), "name": "g", "flag": True, "none": None}],
        },
        "step": torch.tensor(7),
    }


def _equal(a: object, b: object) -> bool:
    """Exact equality of nested state: tensors bit for bit, containers by type."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))  # pyre-ignore[6]
    return type(a) is type(b) and a == b


class FormatVersion1Test(ScratchDirTest):
    """Checkpoints written by format version 1 (no digests, no pages) still load and verify."""

    def test_loads_and_verifies(self) -> None:
        self.assertTrue(_equal(load_checkpoint(_V1), _v1_expected()))
        self.assertEqual(verify_checkpoint(_V1).format_version, 1)
        template = _v1_expected()
        template["model"]["w"] = torch.zeros(5, 3)  # pyre-ignore[16]
        load_checkpoint(_V1, template)
        self.assertTrue(_equal(template, _v1_expected()))

    def test_damaged_data_is_still_caught(self) -> None:
        directory = self.root / "v1"
        shutil.copytree(_V1, directory)
        flip_last_byte(directory / "optimizer-00002-of-00002.safetensors")
        with self.assertRaises(ChecksumMismatchError):
            load_checkpoint(directory)
        self.assertFalse(check_checkpoint(directory).ok)

    def test_a_claimed_world_size_beyond_the_files_is_refused_at_once(self) -> None:
        directory = self.root / "v1"
        shutil.copytree(_V1, directory)
        index = directory / "optimizer.safetensors.index.json"
        index.write_text(index.read_text().replace('"world_size":2', '"world_size":1000000000'))
        with self.assertRaisesRegex(CorruptCheckpointError, r'"world_size": is 1000000000 but .* holds only 3 files'):
            load_checkpoint(directory)


class AllOrNothingLoadTest(ScratchDirTest):
    """A load that raises leaves every template tensor and value as it was."""

    def test_a_checksum_failure_in_the_last_tensor_changes_nothing(self) -> None:
        directory = self.root / "ckpt"
        save_checkpoint(directory, {"a": torch.full((4,), 2.0), "z": torch.arange(8.0), "n": 3, "t": (1, 2)})
        flip_last_byte(directory / "optimizer-00001-of-00001.safetensors")  # the data of "z"
        template = {"a": torch.ones(4), "z": torch.zeros(8), "n": 0, "t": (0, 0)}
        with self.assertRaises(ChecksumMismatchError):
            load_checkpoint(directory, template)
        self.assertTrue(_equal(template, {"a": torch.ones(4), "z": torch.zeros(8), "n": 0, "t": (0, 0)}))

    def test_load_latest_falls_back_with_the_template_equal_to_the_older_checkpoint(self) -> None:
        manager = CheckpointManager(self.root / "run")
        manager.save(1, {"w": torch.full((3,), 1.0)})
        manager.save(2, {"w": torch.full((3,), 2.0), "extra": torch.full((2,), 2.0)})
        flip_last_byte(manager.path_for(2) / "optimizer-00001-of-00001.safetensors")
        template = {"w": torch.zeros(3), "extra": torch.zeros(2)}
        with self.assertWarnsRegex(UserWarning, "step-00000002 does not load"):
            info = manager.load_latest(template, strict=False)
        assert info is not None
        self.assertEqual(info.step, 1)
        # "extra" is not in step 1: it keeps its own value, not step 2's.
        self.assertTrue(_equal(template, {"w": torch.full((3,), 1.0), "extra": torch.zeros(2)}))


class ReplacedWhileLoadingTest(ScratchDirTest):
    """Every file of a save carries its identity: a load never mixes two saves."""

    def test_files_of_a_newer_save_under_an_older_index_are_refused(self) -> None:
        directory = self.root / "ckpt"
        save_checkpoint(directory, {"w": torch.full((4,), 100.0), "step": 100})
        old_index = read_index(directory)
        save_checkpoint(directory, {"w": torch.full((4,), 200.0), "step": 200}, overwrite=True)
        template = {"w": torch.zeros(4), "step": 0}
        for verify in (True, False):
            with self.assertRaisesRegex(CheckpointReplacedError, r"belongs to save [0-9a-f]{32}, the index read before it to save"):
                prepare(old_index, template, None, True, verify)
        self.assertTrue(_equal(template, {"w": torch.zeros(4), "step": 0}))
        load_checkpoint(directory, template)  # starts again from the new index
        self.assertTrue(_equal(template, {"w": torch.full((4,), 200.0), "step": 200}))

    def test_a_listing_that_races_an_overwrite_reads_the_new_checkpoint(self) -> None:
        """The directory is opened for listing, then another save swaps its checkpoint in and
        deletes the old one's files before the listing reads them: the load starts again and reads
        the new checkpoint, instead of reporting that there is none."""
        directory: Path = self.root / "ckpt"
        newer: Path = self.root / "newer"
        save_checkpoint(directory, _numbered_state(1))
        save_checkpoint(newer, _numbered_state(2))
        real_scandir: Callable[[str | os.PathLike[str]], object] = os.scandir

        def listing_during_an_overwrite(path: str | os.PathLike[str]) -> object:
            listing = real_scandir(path)  # the old directory, opened
            if Path(path) == directory and newer.exists():
                aside = self.root / "aside"
                os.rename(directory, aside)
                os.rename(newer, directory)
                for entry in os.listdir(aside):
                    os.unlink(aside / entry)
            return listing

        with mock.patch.object(os, "scandir", side_effect=listing_during_an_overwrite):
            loaded = load_checkpoint(directory)
        self.assertTrue(_equal(loaded, _numbered_state(2)))

    def test_loads_racing_overwrites_get_one_whole_save(self) -> None:
        directory = self.root / "ckpt"
        save_checkpoint(directory, _numbered_state(0))
        stop = self.root / "stop"
        writer = multiprocessing.get_context("spawn").Process(target=_overwrite_until, args=(str(directory), str(stop)))
        writer.start()
        try:
            deadline = time.monotonic() + 60
            while load_checkpoint(directory, keys="step")["step"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)  # until the writer has started replacing
            seen: set[int] = set()
            for _ in range(200):
                loaded = load_checkpoint(directory)
                step = loaded["step"]
                assert isinstance(step, int)
                self.assertTrue(_equal(loaded, _numbered_state(step)), f"a mix of saves at step {step}")
                seen.add(step)
        finally:
            stop.touch()
            writer.join(30)
        self.assertEqual(writer.exitcode, 0)
        self.assertGreater(len(seen), 1, "the writer never replaced the checkpoint during the loads")


def _numbered_state(step: int) -> dict[str, object]:
    return {"step": step, **{f"t{i}": torch.full((64, 64), float(step * 10 + i)) for i in range(8)}}


def _overwrite_until(directory: str, stop: str) -> None:
    step = 0
    while not os.path.exists(stop):
        step += 1
        save_checkpoint(directory, _numbered_state(step), overwrite=True)


class SelectionAndTemplateTest(ScratchDirTest):
    """Selections and templates that would load nothing, or the wrong thing, are typed errors."""

    def setUp(self) -> None:
        super().setUp()
        self.directory = self.root / "ckpt"
        save_checkpoint(self.directory, {"model": {"w": torch.ones(2)}, "optim": {"m": torch.full((2,), 3.0)}})

    def test_a_bare_string_selects_one_top_level_key(self) -> None:
        self.assertTrue(_equal(load_checkpoint(self.directory, keys="model"), {"model": {"w": torch.ones(2)}}))

    def test_a_selection_that_matches_nothing(self) -> None:
        with self.assertRaisesRegex(MissingKeyError, r'^keys= selects \["modle"\] but .*ckpt holds nothing there$'):
            load_checkpoint(self.directory, keys=["modle"])
        template = {"model": {"w": torch.zeros(2)}}
        with self.assertRaisesRegex(MissingKeyError, r'^keys= selects \["optim"\] but the template holds nothing there$'):
            load_checkpoint(self.directory, template, keys=["optim"])
        self.assertEqual(load_checkpoint(self.directory, keys=["modle"], strict=False), {})
        with self.assertRaisesRegex(InvalidArgumentError, r"keys=: 3.5 is not a str or int key"):
            load_checkpoint(self.directory, keys=[3.5])  # pyre-ignore[6]: deliberately invalid

    def test_a_meta_template_is_refused(self) -> None:
        template = {"model": {"w": torch.empty(2, device="meta")}, "optim": {"m": torch.zeros(2)}}
        with self.assertRaisesRegex(TemplateMismatchError, r'^\["model", "w"\]: the template tensor is on the meta device'):
            load_checkpoint(self.directory, template)

    def test_template_leaves_that_share_memory(self) -> None:
        shared = torch.zeros(2)
        with self.assertRaisesRegex(TemplateMismatchError, r"the template's tensors share memory"):
            load_checkpoint(self.directory, {"model": {"w": shared}, "optim": {"m": shared}})
        self.assertTrue(torch.equal(shared, torch.zeros(2)))
        # Tied weights saved with the same bytes load into one tensor.
        tied = self.root / "tied"
        weight = torch.arange(4.0)
        save_checkpoint(tied, {"embed": weight, "head": weight})
        template_weight = torch.zeros(4)
        load_checkpoint(tied, {"embed": template_weight, "head": template_weight})
        self.assertTrue(torch.equal(template_weight, weight))


class RetentionTest(ScratchDirTest):
    """Retention never deletes what was just saved nor the newest good checkpoint, and moves a
    damaged one aside instead of counting it."""

    def test_a_damaged_newest_checkpoint_is_set_aside_not_kept(self) -> None:
        manager = CheckpointManager(self.root, RetentionPolicy(keep_last=1))
        manager.save(100, {"w": torch.full((2,), 100.0)})
        manager.retention = RetentionPolicy(keep_last=None)
        manager.save(200, {"w": torch.full((2,), 200.0)})
        manager.retention = RetentionPolicy(keep_last=1)
        flip_last_byte(manager.path_for(200) / "optimizer-00001-of-00001.safetensors")
        template = {"w": torch.zeros(2)}
        with self.assertWarnsRegex(UserWarning, r"step-00000200 is damaged; renamed it to .*step-00000200\.damaged-[0-9a-f]{16}"):
            info = manager.load_latest(template)
        self.assertEqual(info.step if info else None, 100)
        for step in (110, 120):
            manager.save(step, {"w": torch.full((2,), float(step))})
            self.assertEqual([i.step for i in manager.checkpoints()], [step])
        (aside,) = self.root.glob("step-00000200.damaged-*")  # kept for inspection, never deleted
        self.assertFalse(check_checkpoint(aside).ok)

    def test_an_unreadable_index_is_set_aside_at_the_next_save(self) -> None:
        manager = CheckpointManager(self.root, RetentionPolicy(keep_last=1))
        manager.save(1, {"w": torch.ones(1)})
        (manager.path_for(1) / "optimizer.safetensors.index.json").write_text("{")
        with self.assertWarnsRegex(UserWarning, r"step-00000001 is damaged; renamed it"):
            manager.save(2, {"w": torch.ones(1)})
        self.assertEqual([i.step for i in manager.checkpoints()], [2])

    def test_a_rollback_makes_the_older_step_the_latest(self) -> None:
        manager = CheckpointManager(self.root, RetentionPolicy(keep_last=2))
        manager.save(100, {"w": torch.full((1,), 100.0)})
        manager.save(200, {"w": torch.full((1,), 200.0)})
        with self.assertWarnsRegex(UserWarning, r"saving step 150 after step 200: step 150 becomes the latest"):
            manager.save(150, {"w": torch.full((1,), 150.0)})
        latest = manager.latest()
        self.assertEqual(latest.step if latest else None, 150)
        self.assertEqual([i.step for i in manager.checkpoints()], [200, 150])  # save order
        manager.save(160, {"w": torch.full((1,), 160.0)})
        self.assertEqual([i.step for i in manager.checkpoints()], [150, 160])

    def test_a_deletion_that_fails_is_a_warning_not_a_failed_save(self) -> None:
        manager = CheckpointManager(self.root, RetentionPolicy(keep_last=1))
        manager.save(1, {"w": torch.ones(1)})
        original = manager_module._delete

        def fail(path: Path) -> None:
            raise OSError(errno.EIO, "Input/output error", str(path))

        manager_module._delete = fail  # pyre-ignore[9]: fault injection
        try:
            with self.assertWarnsRegex(UserWarning, r"could not delete .*step-00000001: \[Errno 5\]"):
                future = manager.save(2, {"w": torch.ones(1)})
        finally:
            manager_module._delete = original
        self.assertEqual(future.wait(), manager.path_for(2))
        self.assertEqual([i.step for i in manager.checkpoints()], [1, 2])


def _race(directory: str, value: float, start: str, result: str) -> None:
    while not os.path.exists(start):
        pass
    try:
        save_checkpoint(directory, {"w": torch.full((64,), value)})
        Path(result).write_text("won")
    except CheckpointExistsError:
        Path(result).write_text("lost")


class PublishTest(ScratchDirTest):
    """Create-if-absent is atomic, and only a checkpoint is ever replaced."""

    def test_of_two_racing_saves_exactly_one_wins(self) -> None:
        context = multiprocessing.get_context("fork")
        for round_ in range(12):
            directory, start = self.root / f"ckpt{round_}", self.root / f"start{round_}"
            results = [self.root / f"r{round_}-{i}" for i in range(2)]
            racers = [
                context.Process(target=_race, args=(str(directory), float(i), str(start), str(results[i]))) for i in range(2)
            ]
            for racer in racers:
                racer.start()
            start.touch()
            for racer in racers:
                racer.join(30)
            outcomes = [r.read_text() for r in results]
            self.assertEqual(sorted(outcomes), ["lost", "won"], round_)
            winner = outcomes.index("won")
            self.assertTrue(torch.equal(load_checkpoint(directory)["w"], torch.full((64,), float(winner))))  # pyre-ignore[6]
            self.assertEqual([p.name for p in self.root.glob(f".ckpt{round_}.*")], [])

    def test_overwrite_replaces_only_a_checkpoint(self) -> None:
        state = {"w": torch.ones(2)}
        notes = self.root / "notes"
        (notes / "sub").mkdir(parents=True)
        (notes / "notes.txt").write_text("mine")
        (notes / "sub" / "model.pt").write_bytes(b"x")
        a_file = self.root / "a_file"
        a_file.write_text("mine")
        link = self.root / "link"
        link.symlink_to(notes)
        fifo = self.root / "fifo"
        os.mkfifo(fifo)
        before = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*"))
        for target, what in ((notes, "holds files that are not part of a checkpoint \\(notes.txt, sub\\)"),
                             (a_file, "is a regular file"), (link, "is a symbolic link"), (fifo, "is a special file")):
            with self.assertRaisesRegex(CheckpointExistsError, f"{target.name} {what}.*overwrite=True replaces only checkpoints"):
                save_checkpoint(target, state, overwrite=True)
        self.assertEqual(sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*")), before)
        save_checkpoint(self.root / "ckpt", state)
        save_checkpoint(self.root / "ckpt", {"w": torch.zeros(2)}, overwrite=True)
        self.assertTrue(torch.equal(load_checkpoint(self.root / "ckpt")["w"], torch.zeros(2)))  # pyre-ignore[6]

    def test_without_renameat2_the_fallback_publish_replaces_a_checkpoint(self) -> None:
        original = commit._renameat2
        commit._renameat2 = lambda first, second, flags: False  # an old kernel or NFS
        try:
            save_checkpoint(self.root / "ckpt", {"w": torch.ones(2)})
            with self.assertRaises(CheckpointExistsError):
                save_checkpoint(self.root / "ckpt", {"w": torch.ones(2)})
            save_checkpoint(self.root / "ckpt", {"w": torch.zeros(2)}, overwrite=True)
        finally:
            commit._renameat2 = original
        self.assertTrue(torch.equal(load_checkpoint(self.root / "ckpt")["w"], torch.zeros(2)))  # pyre-ignore[6]
        self.assertEqual(sorted(p.name for p in self.root.iterdir()), ["ckpt"])

    def test_a_kill_between_the_fallback_renames_loses_nothing(self) -> None:
        manager = CheckpointManager(self.root)
        manager.save(1, {"w": torch.full((2,), 1.0)})
        child = multiprocessing.get_context("spawn").Process(target=_overwrite_killed_midway, args=(str(manager.path_for(1)),))
        child.start()
        child.join(60)
        self.assertEqual(child.exitcode, -signal.SIGKILL)
        self.assertFalse(manager.path_for(1).exists())  # the window: the old copy is parked
        self.assertEqual(len(list(self.root.glob(".step-00000001.replaced-*"))), 1)
        with self.assertWarnsRegex(UserWarning, r"restored .*step-00000001 from .*\.replaced-"):
            manager.save(2, {"w": torch.full((2,), 2.0)})
        self.assertTrue(torch.equal(load_checkpoint(manager.path_for(1))["w"], torch.full((2,), 1.0)))  # pyre-ignore[6]
        self.assertEqual(sorted(p.name for p in self.root.iterdir()), ["step-00000001", "step-00000002"])


def _overwrite_killed_midway(directory: str) -> None:
    """Overwrites with the fallback publish and dies between its two renames."""
    commit._renameat2 = lambda first, second, flags: False  # an old kernel or NFS
    rename: Callable[[str, str], None] = os.rename

    def rename_then_die(source: str, destination: str) -> None:
        rename(source, destination)
        if ".replaced-" in str(destination):
            os.kill(os.getpid(), signal.SIGKILL)

    os.rename = rename_then_die  # pyre-ignore[9]: fault injection
    save_checkpoint(directory, {"w": torch.full((2,), 9.0)}, overwrite=True)


class NamesTest(ScratchDirTest):
    """A prefix cannot leave the checkpoint's directory, and long names fit."""

    def test_a_prefix_with_a_path_is_refused_before_anything_is_written(self) -> None:
        for prefix in ("../../escaped", "a/b", ".hidden", "nul\0", "", "x" * 300):
            with self.assertRaises(InvalidArgumentError, msg=repr(prefix)):
                save_checkpoint(self.root / "run" / "ckpt", {"w": torch.ones(1)}, prefix=prefix)
            with self.assertRaises(InvalidArgumentError, msg=repr(prefix)):
                CheckpointManager(self.root / "run", prefix=prefix)
        self.assertEqual(list(self.root.rglob("*")), [])

    def test_a_230_character_directory_name(self) -> None:
        directory = self.root / ("d" * 230)
        save_checkpoint(directory, {"w": torch.ones(1)})
        save_checkpoint(directory, {"w": torch.zeros(1)}, overwrite=True)
        self.assertTrue(torch.equal(load_checkpoint(directory)["w"], torch.zeros(1)))  # pyre-ignore[6]
        self.assertEqual([p.name for p in self.root.iterdir()], [directory.name])


class UntypedErrorsTest(ScratchDirTest):
    def test_conjugate_and_negative_views_are_saved_resolved(self) -> None:
        z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
        x = torch.tensor([1.0, -2.0])
        state = {"conj": z.conj(), "neg": torch._neg_view(x)}
        save_checkpoint(self.root / "ckpt", state)
        loaded = load_checkpoint(self.root / "ckpt")
        self.assertTrue(torch.equal(loaded["conj"], z.conj().resolve_conj()))  # pyre-ignore[6]
        self.assertTrue(torch.equal(loaded["neg"], -x))  # pyre-ignore[6]

    def test_the_cli_prints_one_error_line_and_diff_exits_2(self) -> None:
        save_checkpoint(self.root / "a", {"w": torch.ones(1)})
        (self.root / "b").mkdir()
        (self.root / "b" / "optimizer.safetensors.index.json").write_text('{"metadata": {"format": 5}}')
        for argv, status in ((["diff", str(self.root / "a"), str(self.root / "b")], 2), (["inspect", str(self.root / "b")], 1)):
            with tempfile.TemporaryFile("w+") as err, contextlib.redirect_stderr(err):
                self.assertEqual(main(argv), status)
                err.seek(0)
                lines = err.read().splitlines()
            self.assertEqual(len(lines), 1, lines)
            self.assertTrue(lines[0].startswith("error: "), lines)

    def test_listing_checkpoints_skips_a_fifo_index_without_blocking(self) -> None:
        manager = CheckpointManager(self.root)
        manager.save(1, {"w": torch.ones(1)})
        index = manager.path_for(1) / "optimizer.safetensors.index.json"
        index.unlink()
        os.mkfifo(index)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.assertEqual(manager.checkpoints(), [])
        self.assertRegex(str(caught[0].message), r"the index is not a regular file \(it is a FIFO\)")
