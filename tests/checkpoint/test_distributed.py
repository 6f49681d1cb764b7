# pyre-strict
"""Multi-rank saves and resharding loads on real gloo processes."""

import errno
import json
import os
import tempfile
import unittest
from collections.abc import Callable
from pathlib import Path

import torch
from parameterized import parameterized
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor, DTensor, Replicate, Shard

from distributed_shampoo.checkpoint import (
    CheckpointWriteError,
    InconsistentStateError,
    load_checkpoint,
    MissingShardFileError,
    save_checkpoint,
    UnsupportedValueError,
    verify_checkpoint,
)
from distributed_shampoo.distributor.block_distributor import block_owners
from distributed_shampoo.checkpoint.collectives import Group
from distributed_shampoo.launch import run_on_ranks
from tests.checkpoint.faults import DISK_FULL_REPORT, expect_failure_on_every_rank, fail_fsyncs_of_this_rank, fill_disk_of_this_rank, FSYNC_FAILED_REPORT
from tests.checkpoint.tamper import writing_loader_files

# (name, global shape): uneven for 3 and 4 ranks along both dimensions.
_SHARDED: list[tuple[str, tuple[int, ...]]] = [("a", (7, 5)), ("b", (10, 9)), ("c", (3, 11))]


def _full(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(shape, generator=generator)


def _save_sharded(rank: int, world_size: int, directory: str, dim: int) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    state: dict[str, object] = {
        name: distribute_tensor(_full(name, shape), mesh, [Shard(dim)]) for name, shape in _SHARDED
    }
    state["replicated"] = distribute_tensor(_full("r", (4, 4)), mesh, [Replicate()])
    state["step"] = torch.tensor(5.0)  # the same plain tensor on every rank: written once
    state["lr"] = 0.25
    with writing_loader_files():  # the loads below read them; test_block_owned_state's read the index
        save_checkpoint(directory, {"state": state})


def _load_sharded(rank: int, world_size: int, directory: str, dim: int) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    state: dict[str, object] = {
        name: distribute_tensor(torch.zeros(shape), mesh, [Shard(dim)]) for name, shape in _SHARDED
    }
    state["replicated"] = distribute_tensor(torch.zeros(4, 4), mesh, [Replicate()])
    state["step"] = torch.tensor(0.0)
    state["lr"] = 0.0
    template = {"state": state}
    load_checkpoint(directory, template)
    for name, shape in _SHARDED:
        tensor = state[name]
        assert isinstance(tensor, DTensor)
        chunks = torch.chunk(_full(name, shape), world_size, dim)
        expected_local = chunks[rank] if rank < len(chunks) else torch.empty(0)
        assert torch.equal(tensor.to_local(), expected_local.reshape(tensor.to_local().shape)), name
        assert torch.equal(tensor.full_tensor(), _full(name, shape)), name
    replicated = state["replicated"]
    assert isinstance(replicated, DTensor)
    assert torch.equal(replicated.to_local(), _full("r", (4, 4)))
    assert torch.equal(state["step"], torch.tensor(5.0))  # pyre-ignore[6]
    assert state["lr"] == 0.25


def _block_sizes() -> list[tuple[int, int]]:
    return [(4 + i % 3, 3 + i % 5) for i in range(11)]


def _owned_blocks(world_size: int, rank: int) -> list[int]:
    sizes = [r * c * 4 for r, c in _block_sizes()]
    return [i for i, owner in enumerate(block_owners(sizes, world_size)) if owner == rank]


def _block_value(i: int, which: str) -> torch.Tensor:
    return _full(f"{which}{i}", _block_sizes()[i])


def _save_blocks(rank: int, world_size: int, directory: str) -> None:
    blocks = {
        f"block_{i}": {"factor_matrices": {0: _block_value(i, "L"), 1: _block_value(i, "R")}, "momentum": _block_value(i, "m")}
        for i in _owned_blocks(world_size, rank)
    }
    save_checkpoint(directory, {"state": {"layer.weight": {**blocks, "step": 3}}})


def _load_blocks(rank: int, world_size: int, directory: str) -> None:
    owned = _owned_blocks(world_size, rank)
    template = {
        "state": {
            "layer.weight": {
                **{
                    f"block_{i}": {
                        "factor_matrices": {0: torch.zeros(_block_sizes()[i]), 1: torch.zeros(_block_sizes()[i])},
                        "momentum": torch.zeros(_block_sizes()[i]),
                    }
                    for i in owned
                },
                "step": 0,
            }
        }
    }
    load_checkpoint(directory, template)
    state = template["state"]["layer.weight"]
    assert state["step"] == 3
    for i in owned:
        block = state[f"block_{i}"]
        assert isinstance(block, dict)
        assert torch.equal(block["factor_matrices"][0], _block_value(i, "L")), i
        assert torch.equal(block["factor_matrices"][1], _block_value(i, "R")), i
        assert torch.equal(block["momentum"], _block_value(i, "m")), i  # pyre-ignore[6]: a tensor at runtime.


def _save_inconsistent(rank: int, world_size: int, directory: str) -> None:
    try:
        save_checkpoint(directory, {"w": torch.zeros(2 + rank)})
    except InconsistentStateError as error:
        assert 'rank 0 has a whole F32 tensor of shape [2] but rank 1 has a whole F32 tensor of shape [3]' in str(error), error
    else:
        raise AssertionError("no InconsistentStateError")


def _save_unsupported_on_one_rank(rank: int, world_size: int, directory: str) -> None:
    try:
        save_checkpoint(directory, {"x": {1, 2} if rank == 1 else 1}, overwrite=True)
    except UnsupportedValueError as error:
        assert '["x"]: cannot save a builtins.set' in str(error), error
    else:
        raise AssertionError("no UnsupportedValueError")


# Write faults of rank 1: how to cause it, the errno rank 1 raises, what the other ranks report.
# A failed fsync comes after rank 1's records reached rank 0, which then must not publish.
_RANK_1_WRITE_FAULTS: dict[str, tuple[Callable[[], None], int, str]] = {
    "disk full": (fill_disk_of_this_rank, errno.ENOSPC, DISK_FULL_REPORT),
    "fsync failed": (fail_fsyncs_of_this_rank, errno.EIO, FSYNC_FAILED_REPORT),
}


def _save_with_a_write_fault_on_rank_1(rank: int, world_size: int, directory: str, fault: str) -> None:
    inject, code, report = _RANK_1_WRITE_FAULTS[fault]
    if rank == 1:
        inject()
    expect_failure_on_every_rank(
        rank, 1, lambda: save_checkpoint(directory, {f"r{rank}": torch.ones(3)}, overwrite=True),
        lambda error: isinstance(error, CheckpointWriteError) and error.errno == code, report,
    )


def _save_under_a_file(rank: int, world_size: int, directory: str) -> None:
    expect_failure_on_every_rank(  # rank 0 cannot mkdir under a file
        rank, 0, lambda: save_checkpoint(directory, {"x": torch.ones(1)}),
        lambda error: isinstance(error, CheckpointWriteError) and error.errno == errno.EEXIST,
        "nothing was published: rank 0: FileExistsError",
    )


def _coordinate(rank: int, world_size: int) -> None:
    """Plans go to rank 0 alone, and each rank gets back only what rank 0 meant for it."""
    group = Group.resolve(None, timeout_s=30)
    gathered = group.gather_to_first({"rank": rank, "plan": "x" * (rank + 1)})
    if rank == 0:
        assert gathered == [{"rank": r, "plan": "x" * (r + 1)} for r in range(world_size)], gathered
    else:
        assert gathered is None, gathered
    decisions = [f"decision for {r}" * (r + 1) for r in range(world_size)] if rank == 0 else None
    assert group.scatter_from_first(decisions) == f"decision for {rank}" * (rank + 1)


class DistributedCheckpointTest(unittest.TestCase):
    def test_plans_go_to_rank_0_and_decisions_come_back(self) -> None:
        run_on_ranks(3, _coordinate)

    def setUp(self) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        self.directory = str(Path(self._tmp.name) / "ckpt")

    def tearDown(self) -> None:
        self._tmp.cleanup()

    @parameterized.expand(
        [
            ("2_to_4_dim0", 2, 4, 0, 0),
            ("4_to_2_dim0", 4, 2, 0, 0),
            ("3_to_2_uneven_dim0", 3, 2, 0, 0),
            ("2_to_1_consolidate", 2, 1, 0, 0),
            ("same_size", 2, 2, 0, 0),
            ("2_to_4_dim1", 2, 4, 1, 1),
            ("3_to_2_uneven_dim1", 3, 2, 1, 1),
            ("dim0_to_dim1", 2, 3, 0, 1),
        ]
    )
    def test_resharding_matrix(self, _name: str, save_world: int, load_world: int, save_dim: int, load_dim: int) -> None:
        run_on_ranks(save_world, _save_sharded, self.directory, save_dim)
        index = verify_checkpoint(self.directory)
        files = sorted(os.listdir(self.directory))
        # The shard files and the index, and the loader's files: the manifest, the lookup table, a part per rank.
        self.assertEqual(len(files), save_world + 1 + 2 + save_world)
        # Replicated state is written once, by rank 0.
        self.assertEqual(index.weight_map['["state", "replicated"]'], f"optimizer-00001-of-{save_world:05d}.safetensors")
        self.assertEqual(index.weight_map['["state", "step"]'], f"optimizer-00001-of-{save_world:05d}.safetensors")
        self.assertEqual(len(index.tensors['["state", "a"]'].chunks), min(save_world, 7 if save_dim == 0 else 5))
        run_on_ranks(load_world, _load_sharded, self.directory, load_dim)
        consolidated = load_checkpoint(self.directory)  # no template: whole tensors, no collective
        for name, shape in _SHARDED:
            self.assertTrue(torch.equal(consolidated["state"][name], _full(name, shape)))  # pyre-ignore[16]

    @parameterized.expand([("4_to_3", 4, 3), ("4_to_1", 4, 1), ("1_to_4", 1, 4), ("2_to_2", 2, 2)])
    def test_block_owned_state(self, _name: str, save_world: int, load_world: int) -> None:
        run_on_ranks(save_world, _save_blocks, self.directory)
        index = verify_checkpoint(self.directory)
        self.assertEqual(len(index.tensors), 11 * 3)
        # A small index has no loader's files: each loading rank reads its entries from the index.
        self.assertEqual(len(os.listdir(self.directory)), save_world + 1)
        run_on_ranks(load_world, _load_blocks, self.directory)

    def test_a_selected_load_reads_only_the_files_that_hold_the_selection(self) -> None:
        run_on_ranks(2, _save_blocks, self.directory)
        first, second = _owned_blocks(2, 0)[0], _owned_blocks(2, 1)[0]
        (Path(self.directory) / "optimizer-00002-of-00002.safetensors").unlink()
        template = {
            "state": {"layer.weight": {f"block_{i}": {"momentum": torch.zeros(_block_sizes()[i])} for i in (first, second)}}
        }
        load_checkpoint(self.directory, template, keys=[("state", "layer.weight", f"block_{first}")])
        blocks = template["state"]["layer.weight"]
        self.assertTrue(torch.equal(blocks[f"block_{first}"]["momentum"], _block_value(first, "m")))
        self.assertTrue(torch.equal(blocks[f"block_{second}"]["momentum"], torch.zeros(_block_sizes()[second])))
        with self.assertRaisesRegex(MissingShardFileError, r"shard file .*optimizer-00002-of-00002.safetensors does not exist"):
            load_checkpoint(self.directory, template)

    def test_ranks_disagreeing_on_a_key(self) -> None:
        run_on_ranks(2, _save_inconsistent, self.directory)
        self.assertEqual(os.listdir(self._tmp.name), [])

    def test_rank_0_failing_to_create_the_directory_fails_every_rank_without_waiting(self) -> None:
        blocker = Path(self._tmp.name) / "a_file"
        blocker.write_text("")
        run_on_ranks(2, _save_under_a_file, str(blocker / "ckpt"), collective_timeout_s=30)

    def test_failure_on_one_rank_fails_every_rank_and_keeps_the_old_checkpoint(self) -> None:
        save_checkpoint(self.directory, {"old": torch.arange(3)})
        failing_saves: list[tuple[Callable[..., None], tuple[str, ...]]] = [
            (_save_unsupported_on_one_rank, ()),
            *((_save_with_a_write_fault_on_rank_1, (fault,)) for fault in _RANK_1_WRITE_FAULTS),
        ]
        for failing_save, fault in failing_saves:
            run_on_ranks(2, failing_save, self.directory, *fault)
            self.assertEqual(os.listdir(self._tmp.name), ["ckpt"])
            self.assertTrue(torch.equal(load_checkpoint(self.directory)["old"], torch.arange(3)))  # pyre-ignore[6]
            self.assertEqual(json.loads(Path(self.directory, "optimizer.safetensors.index.json").read_text())["metadata"]["world_size"], 1)


def _fsdp_model(world_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        x, y = torch.randn(12, 8, generator=generator), torch.randn(12, 5, generator=generator)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def _full_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, object]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, StateDictOptions

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"model": get_model_state_dict(model, options=options), "optim": get_optimizer_state_dict(model, optimizer, options=options)}


def _fsdp_save(rank: int, world_size: int, directory: str, reference: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, optimizer = _fsdp_model(world_size)
    _train(model, optimizer, 3, seed=1)
    save_checkpoint(directory, {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)})
    full = _full_states(model, optimizer)
    if rank == 0:
        torch.save(full, reference)


def _fsdp_load(rank: int, world_size: int, directory: str, reference: str) -> None:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model, optimizer = _fsdp_model(world_size)
    template = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    load_checkpoint(directory, template)
    set_model_state_dict(model, template["model"])
    set_optimizer_state_dict(model, optimizer, template["optim"])
    actual = _full_states(model, optimizer)  # collective; with cpu_offload only rank 0 gets it
    if rank == 0:
        _assert_bit_equal(actual, torch.load(reference), "")
    before = [p.full_tensor().clone() for p in model.parameters()]  # pyre-ignore[16]
    loss = _train(model, optimizer, 2, seed=2)
    assert loss == loss and all(not torch.equal(b, p.full_tensor()) for b, p in zip(before, model.parameters()))


def _assert_bit_equal(actual: object, expected: object, path: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype and torch.equal(actual, expected), path
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (path, set(actual) ^ set(expected))  # pyre-ignore[6]
        for key in expected:
            _assert_bit_equal(actual[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for position, (a, e) in enumerate(zip(actual, expected)):
            _assert_bit_equal(a, e, f"{path}/{position}")
    else:
        assert actual == expected, (path, actual, expected)


class Fsdp2Test(unittest.TestCase):
    def test_adam_state_saved_on_3_ranks_loads_on_2_and_training_continues(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            directory, reference = str(Path(tmp) / "ckpt"), str(Path(tmp) / "reference.pt")
            run_on_ranks(3, _fsdp_save, directory, reference)
            verify_checkpoint(directory)
            run_on_ranks(2, _fsdp_load, directory, reference)

