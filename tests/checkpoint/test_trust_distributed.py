# pyre-strict
"""What loads is what was saved, on real gloo ranks: verified resharding reads, ranks that
disagree, templates that cannot be filled, and failures that must reach every rank at once."""

import os
import tempfile
import time
import unittest
import warnings
from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor, DTensor, Partial, Shard

from distributed_shampoo.checkpoint import (
    check_checkpoint,
    CheckpointError,
    CheckpointManager,
    ChecksumMismatchError,
    DistributedSaveError,
    InconsistentStateError,
    load_checkpoint,
    save_checkpoint,
    TemplateMismatchError,
)
from distributed_shampoo.checkpoint import manager as manager_module
from distributed_shampoo.checkpoint.collectives import Group
from distributed_shampoo.launch import run_on_ranks
from tests.checkpoint.faults import break_writes_of_this_rank, expect_failure_on_every_rank, kill_this_process, raising

# 4 MiB: each rank's chunk of a 2-rank Shard(0) save spans two 1 MiB pages.
_ROWS, _COLS = 4096, 256


def _full() -> torch.Tensor:
    return torch.arange(_ROWS * _COLS, dtype=torch.float32).reshape(_ROWS, _COLS)


def _save_sharded(rank: int, world_size: int, directory: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    save_checkpoint(directory, {"w": distribute_tensor(_full(), mesh, [Shard(0)])})


def _load_sharded_expecting(rank: int, world_size: int, directory: str, failing_ranks: tuple[int, ...], report: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    template = {"w": distribute_tensor(torch.zeros(_ROWS, _COLS), mesh, [Shard(0)])}
    local = template["w"].to_local()
    try:
        load_checkpoint(directory, template)
    except ChecksumMismatchError as error:
        assert rank in failing_ranks, f"rank {rank} should have loaded: {error}"
        assert report in str(error), error
        assert torch.equal(local, torch.zeros_like(local)), "a failed load changed the template"
        return
    assert rank not in failing_ranks, f"rank {rank} loaded damaged bytes"
    rows = torch.chunk(_full(), world_size)[rank]
    assert torch.equal(local, rows)


def _save_disagreeing(rank: int, world_size: int, directory: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    local_rows = 4 if rank == 0 else 3
    cases: list[tuple[object, str]] = [
        ({"w": torch.full((3,), float(rank))}, '["w"]: rank 0 and rank 1 hold different values'),
        ({"w": torch.ones(3) if rank == 0 else 7}, '["w"]: rank 0 has a tensor but another rank has a value there'),
        ({"w": {"x": torch.ones(3)} if rank == 0 else torch.ones(3)}, '["w"]: one rank has a dict but another has a tensor there'),
        ({"w": [torch.ones(3)] if rank == 0 else {0: torch.ones(3)}}, '["w"]: rank 0 has a list but rank 1 has a dict'),
        (
            {"w": DTensor.from_local(torch.ones(local_rows, 2), mesh, [Shard(0)], run_check=False, shape=torch.Size((8, 2)), stride=(2, 1))},
            '["w"]: the DTensor\'s local tensor has shape [3, 2] but its placements give this rank a [4, 2] region',
        ),
    ]
    for state, message in cases:
        try:
            save_checkpoint(directory, state)  # pyre-ignore[6]: deliberately mismatched state dicts
        except InconsistentStateError as error:  # on every rank, naming the key and the ranks
            assert message in str(error), (message, str(error))
        else:
            raise AssertionError(f"rank {rank}: saving {state} did not fail")
        assert not os.path.exists(directory), "a failed save published a checkpoint"


def _load_into_partial(rank: int, world_size: int, directory: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    template = {"w": DTensor.from_local(torch.zeros(_ROWS, _COLS), mesh, [Partial()])}
    try:
        load_checkpoint(directory, template)
    except TemplateMismatchError as error:
        assert '["w"]: a DTensor with a Partial placement holds unreduced values' in str(error), error
    else:
        raise AssertionError("a Partial template was filled")


def _load_latest_with_an_untyped_failure_on_rank_1(rank: int, world_size: int, root: str) -> None:
    manager = CheckpointManager(root, timeout_s=20)
    if rank == 1:
        manager_module.prepare_load = raising(IsADirectoryError(21, "Is a directory", "somewhere"))  # pyre-ignore[9]: fault injection
    expect_failure_on_every_rank(
        rank, 1, lambda: manager.load_latest({"w": torch.zeros(2)}),
        lambda error: isinstance(error, IsADirectoryError), "rank 1: IsADirectoryError", others=CheckpointError, within_s=10,
    )


def _save_interrupted_on_rank_1(rank: int, world_size: int, directory: str) -> None:
    if rank == 1:
        break_writes_of_this_rank(raising(KeyboardInterrupt()))
    expect_failure_on_every_rank(  # rank 1's KeyboardInterrupt is caught by the user's handler
        rank, 1, lambda: save_checkpoint(directory, {f"r{rank}": torch.ones(2)}, timeout_s=60),
        lambda error: isinstance(error, KeyboardInterrupt), "rank 1: KeyboardInterrupt", within_s=10,
    )


def _save_killed_on_rank_1(rank: int, world_size: int, root: str) -> None:
    manager = CheckpointManager(root, timeout_s=30)
    if rank == 1:
        break_writes_of_this_rank(kill_this_process)
    started = time.monotonic()
    try:
        manager.save(1, {f"r{rank}": torch.ones(2)})
    except DistributedSaveError as error:
        assert "another rank died" in str(error), error
    else:
        raise AssertionError("the save succeeded without rank 1")
    assert time.monotonic() - started < 10, "a dead rank took too long to notice"
    assert not list(Path(root).glob(".step-*")), "the dead save's staging directory was left"


def _rank_1_dies_after_the_commit(rank: int, world_size: int, directory: str) -> None:
    if rank == 1:
        Group.broadcast_from_first = kill_this_process  # pyre-ignore[41]: fault injection: dies before the outcome arrives
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        published = save_checkpoint(directory, {f"r{rank}": torch.ones(2)}, timeout_s=30)
    assert str(published) == directory, published
    assert any("the checkpoint was published" in str(w.message) for w in caught), [str(w.message) for w in caught]


class VerifiedReshardingTest(unittest.TestCase):
    def test_a_rank_reading_part_of_a_damaged_piece_raises_and_only_that_rank(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            directory = str(Path(tmp, "ckpt"))
            run_on_ranks(2, _save_sharded, directory)
            shard = Path(directory, "optimizer-00001-of-00002.safetensors")
            data = bytearray(shard.read_bytes())
            data[len(data) - (2 << 20)] ^= 0x40  # first page of rank 0's chunk: rows 0..1023
            shard.write_bytes(bytes(data))
            # At 3 ranks, rank 0 reads rows 0..1365 (pages 0 and 1 of that chunk), rank 1 rows
            # 1366..2730 (page 1, and the other chunk): only rank 0 touches the damaged page.
            report = check_checkpoint(directory)  # the page and the whole checksum, in one read
            self.assertEqual(
                [str(problem).split(": ", 1)[1].split(" has ")[0] for problem in report.problems],
                ['["w"]#0,0 page 0', '["w"]#0,0'],
            )
            run_on_ranks(3, _load_sharded_expecting, directory, (0,), '["w"]#0,0 page 0 has checksum')
            run_on_ranks(1, _load_sharded_expecting, directory, (0,), '["w"]#0,0 has checksum')  # read whole
            run_on_ranks(2, _load_into_partial, directory)


class DisagreeingRanksTest(unittest.TestCase):
    def test_every_disagreement_fails_the_save_on_every_rank(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            run_on_ranks(2, _save_disagreeing, str(Path(tmp, "ckpt")))
            self.assertEqual(os.listdir(tmp), [])


class RankFailureTest(unittest.TestCase):
    def test_an_untyped_failure_in_load_latest_reaches_every_rank_at_once(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            CheckpointManager(tmp).save(1, {"w": torch.ones(2)})
            run_on_ranks(2, _load_latest_with_an_untyped_failure_on_rank_1, tmp, collective_timeout_s=300)

    def test_an_interrupted_rank_fails_the_save_everywhere_at_once(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            run_on_ranks(2, _save_interrupted_on_rank_1, str(Path(tmp, "ckpt")), collective_timeout_s=300)
            self.assertEqual(os.listdir(tmp), [])

    def test_a_rank_dying_after_the_commit_does_not_turn_a_published_save_into_a_failure(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            directory = str(Path(tmp, "ckpt"))
            with self.assertRaises(AssertionError) as raised:
                run_on_ranks(2, _rank_1_dies_after_the_commit, directory, collective_timeout_s=300)
            self.assertEqual(str(raised.exception).split("\n", 1)[1], "rank 1: exit code -9\n(no traceback: the process died)")
            self.assertTrue(torch.equal(load_checkpoint(directory)["r0"], torch.ones(2)))  # pyre-ignore[6]

    def test_a_killed_rank_fails_the_save_with_a_typed_error_and_no_debris(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            with self.assertRaises(AssertionError) as raised:
                run_on_ranks(2, _save_killed_on_rank_1, tmp, collective_timeout_s=300)
            failures = str(raised.exception).split("\n", 1)[1]
            self.assertEqual(failures, "rank 1: exit code -9\n(no traceback: the process died)")  # rank 0 passed
            manager = CheckpointManager(tmp)
            manager.save(2, {"w": torch.ones(2)})
            self.assertEqual(sorted(os.listdir(tmp)), ["step-00000002"])
