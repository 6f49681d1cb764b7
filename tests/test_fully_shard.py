# pyre-strict
"""DistributedShampoo under FSDP2 (``fully_shard``) on real gloo ranks: the single-process
trajectory bit for bit at 2, 3 and 4 ranks, and checkpoints that resume under FSDP2 or DDP at
another world size."""

import contextlib
import json
import unittest
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
from parameterized import parameterized
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
from torch.distributed.tensor import distribute_tensor, DTensor, Replicate

from distributed_shampoo import (
    AdamPreconditionerConfig,
    DDPDistributedConfig,
    DistributedShampoo,
    FullyShardDistributedConfig,
    HybridShardDistributedConfig,
)
from distributed_shampoo.checkpoint.plan import local_data
from distributed_shampoo.launch import run_on_ranks
from distributed_shampoo.utils.shampoo_checkpoint_utils import flatten
from tests.trajectories import load_training_state, read_result, save_training_state, TrajectoryTestCase

STEPS = 8
SAVE_AT = 4  # the checkpoint holds the state after this many steps
LATER_SAVE_AT = 6  # a resumed run saves again here


@dataclass(frozen=True)
class Run:
    """One training run: ``mode`` is "fsdp", "hsdp" (hybrid sharding), "ddp" or "single" (no process group)."""

    mode: str
    out: str  # rank 0 writes the losses and the final full parameters here
    save_dir: str | None = None
    save_at: int = SAVE_AT
    resume_dir: str | None = None
    resume_at: int = SAVE_AT


def _model() -> torch.nn.Sequential:
    """Conv, 2-D and 1-D parameters; 3 and 7 rows (uneven over 2 and 4 ranks) and 1 row (empty
    shards); the conv weight (3, 2, 2, 2) merges to (6, 4), so a merged row is half a row."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 2), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(48, 7), torch.nn.Tanh(),
        torch.nn.Linear(7, 1),
    )


def _optimizer(model: torch.nn.Module, mode: str) -> DistributedShampoo:
    """Two groups: decoupled weight decay (conv and hidden layer) and an L2 term (the head)."""
    params = list(model.parameters())
    config = {
        "fsdp": FullyShardDistributedConfig(), "hsdp": HybridShardDistributedConfig(), "ddp": DDPDistributedConfig(), "single": None,
    }[mode]
    return DistributedShampoo(
        [{"params": params[:4]}, {"params": params[4:], "use_decoupled_weight_decay": False}],
        lr=0.02, betas=(0.9, 0.999), epsilon=1e-8, momentum=0.5, weight_decay=1e-3, max_preconditioner_dim=6,
        precondition_frequency=2, grafting_config=AdamPreconditionerConfig(beta2=0.999), distributed_config=config,
    )


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    """One of two full batches (by the parity of ``step``), the same on every rank; a linear teacher gives the targets."""
    teacher = torch.randn(50, 1, generator=torch.Generator().manual_seed(7)) / 50**0.5
    inputs = torch.randn(32, 2, 5, 5, generator=torch.Generator().manual_seed(100 + step % 2))
    targets = inputs.flatten(1) @ teacher
    return torch.nn.functional.mse_loss(model(inputs), targets)


def _fully_shard(model: torch.nn.Module, world_size: int, hybrid: bool = False) -> None:
    """FSDP2 with float64 gradient averaging: the mean of identical float32 gradients is exact.
    Hybrid: 2 replicas, each sharded over half the ranks (HSDP)."""
    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard")) if hybrid else init_device_mesh("cpu", (world_size,))
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float64)
    for layer in model.children():
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's shards gathered (a collective), a plain tensor as it is."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def train(rank: int, world_size: int, run: Run) -> None:
    """Trains to STEPS (from ``run.resume_at`` when resuming); rank 0 writes the trajectory."""
    torch.set_num_threads(1)
    model = _model()
    if run.mode in ("fsdp", "hsdp"):
        _fully_shard(model, world_size, hybrid=run.mode == "hsdp")
    optimizer = _optimizer(model, run.mode)
    head_bias = list(model.parameters())[-1]
    first_step = 0
    if run.resume_dir is not None:
        load_training_state(run.resume_dir, model, optimizer)
        first_step = run.resume_at
    losses: list[float] = []
    for step in range(first_step, STEPS):
        if step == run.save_at and run.save_dir is not None:
            save_training_state(run.save_dir, model, optimizer)
        optimizer.zero_grad()
        loss = _loss(model, step)
        loss.backward()
        if step % 2 == 1:
            head_bias.grad = None  # a parameter without a gradient is skipped this step
        optimizer.step()
        losses.append(float(loss.detach()))
    params = {name: _full(param) for name, param in model.named_parameters()}
    if rank == 0:
        torch.save({"losses": losses, "params": params}, run.out)


def _wide_mlp() -> torch.nn.Sequential:
    """An MLP of 68 blocks at max_preconditioner_dim 32."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(96, 160), torch.nn.Tanh(), torch.nn.Linear(160, 160), torch.nn.Tanh(), torch.nn.Linear(160, 96)
    )


def _wide_model(world_size: int) -> torch.nn.Sequential:
    """``_wide_mlp`` under fully_shard."""
    model = _wide_mlp()
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.children():
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def report_ownership(rank: int, world_size: int, out: str) -> None:
    """One step on the wide model; rank 0 writes each rank's blocks, state and traffic."""
    torch.set_num_threads(1)
    model = _wide_model(world_size)
    optimizer = DistributedShampoo(
        model.parameters(), betas=(0.9, 0.999), momentum=0.5, max_preconditioner_dim=32,
        grafting_config=AdamPreconditionerConfig(), distributed_config=FullyShardDistributedConfig(),
    )
    model(torch.randn(8, 96, generator=torch.Generator().manual_seed(1))).square().mean().backward()
    optimizer.step()
    state = cast(dict[str, dict[str, object]], optimizer.distributed_state_dict(model.named_parameters(), False, layout="nested")["state"])
    blocks = {name: [key for key in param_state if key.startswith("block_")] for name, param_state in state.items()}
    owned_states = [cast(dict[str, object], state[name][key]) for name in blocks for key in blocks[name]]
    sent, received = optimizer.bytes_communicated()
    mine = {
        "blocks": blocks,
        "state_bytes": sum(
            value.nbytes for block_state in owned_states for value in flatten(block_state).values() if isinstance(value, torch.Tensor)
        ),
        "sent": sent,
        "received": received,
        "shard_bytes": sum(local_data(param).nbytes for param in model.parameters()),
        # Each block's momentum has the block's shape: these are the owned blocks' gradient bytes.
        "owned_block_bytes": sum(cast(torch.Tensor, block_state["momentum"]).nbytes for block_state in owned_states),
    }
    reports: list[object] = [None for _ in range(world_size)]
    dist.all_gather_object(reports, mine)
    if rank == 0:
        Path(out).write_text(json.dumps(reports))


def refuse_bad_input(rank: int, world_size: int) -> None:
    """Each misuse raises the same error on every rank, and a refused step changes nothing."""
    model = _wide_model(world_size)
    with _raises(ValueError, "are DTensors; pass distributed_config=FullyShardDistributedConfig() for fully_shard models"):
        DistributedShampoo(model.parameters(), distributed_config=DDPDistributedConfig())
    replicated = torch.nn.Parameter(distribute_tensor(torch.ones(4, 4), init_device_mesh("cpu", (world_size,)), [Replicate()]))
    with _raises(ValueError, "parameter #0 is placed (Replicate(),) on a 1-D mesh with shape (4, 4); expected fully_shard's"):
        DistributedShampoo([replicated], distributed_config=FullyShardDistributedConfig())
    optimizer = DistributedShampoo(model.parameters(), distributed_config=FullyShardDistributedConfig())
    model(torch.ones(2, 96)).sum().backward()
    if rank == 1:
        list(model.parameters())[1].grad = None
    before = [local_data(param).clone() for param in model.parameters()]
    with _raises(RuntimeError, "parameters #[1] have a gradient on some ranks and none on others"):
        optimizer.step()
    assert all(torch.equal(local_data(param), old) for param, old in zip(model.parameters(), before)), "a refused step moved parameters"
    assert all(int(param_state["step"]) == 0 for param_state in optimizer.state.values() if "step" in param_state), "a refused step advanced a step count"


@contextlib.contextmanager
def _raises(error: type[Exception], message: str) -> Iterator[None]:
    try:
        yield
    except error as raised:
        if message not in str(raised):
            raise AssertionError(f"expected {message!r} in {raised!r}") from raised
    else:
        raise AssertionError(f"{error.__name__} not raised")


class FullyShardTest(TrajectoryTestCase):
    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        threads = torch.get_num_threads()
        try:
            train(0, 1, Run("single", cls.path("single")))  # in this process, on one thread as the ranks
        finally:
            torch.set_num_threads(threads)
        cls.reference = read_result(cls.path("single"))
        for world_size in (4, 2):
            run_on_ranks(world_size, train, Run("fsdp", cls.path(f"fsdp{world_size}"), save_dir=cls.path(f"ckpt{world_size}")))

    def test_the_reference_trains(self) -> None:
        losses = self.reference[0]
        self.assertLess(float(sum(losses[SAVE_AT:])), float(sum(losses[:SAVE_AT])))

    @parameterized.expand([(2,), (4,)])
    def test_follows_the_single_process_trajectory(self, world_size: int) -> None:
        self.assertSameTrajectory(read_result(self.path(f"fsdp{world_size}")))

    def test_three_ranks_follow_the_single_process_trajectory(self) -> None:
        run_on_ranks(3, train, Run("fsdp", self.path("fsdp3")))
        self.assertSameTrajectory(read_result(self.path("fsdp3")))

    def test_one_rank_agrees_to_float_rounding(self) -> None:
        # At one rank FSDP2's own gradient path differs from plain training by an ulp.
        run_on_ranks(1, train, Run("fsdp", self.path("fsdp1")))
        losses, params = read_result(self.path("fsdp1"))
        torch.testing.assert_close(losses, self.reference[0], rtol=0, atol=1e-6)
        for name, value in self.reference[1].items():
            torch.testing.assert_close(params[name], value, rtol=0, atol=1e-6)

    def test_hybrid_sharding_follows_the_trajectory_and_its_checkpoint_resumes_under_fsdp2(self) -> None:
        # 2 replicas x 2 shards: each replica distributes the blocks over its 2 ranks, both compute
        # the same steps; the replicas' copies of a block are written once.
        run_on_ranks(4, train, Run("hsdp", self.path("hsdp4"), save_dir=self.path("ckpt_hsdp4")))
        self.assertSameTrajectory(read_result(self.path("hsdp4")))
        run_on_ranks(3, train, Run("fsdp", self.path("hsdp4to3"), resume_dir=self.path("ckpt_hsdp4")))
        self.assertSameTrajectory(read_result(self.path("hsdp4to3")), from_step=SAVE_AT)

    @parameterized.expand([("4_to_2", 4, 2), ("4_to_3", 4, 3), ("2_to_4", 2, 4)])
    def test_resumes_at_another_world_size(self, _: str, saved_on: int, resumed_on: int) -> None:
        out = self.path(f"resume{saved_on}to{resumed_on}")
        run_on_ranks(resumed_on, train, Run("fsdp", out, resume_dir=self.path(f"ckpt{saved_on}")))
        self.assertSameTrajectory(read_result(out), from_step=SAVE_AT)

    def test_each_block_on_one_rank_state_balanced_traffic_bounded(self) -> None:
        world_size = 4
        out = self.path("ownership.json")
        run_on_ranks(world_size, report_ownership, out)
        reports = json.loads(Path(out).read_text())
        owned = [{(name, key) for name, keys in report["blocks"].items() for key in keys} for report in reports]
        self.assertEqual(sum(len(blocks) for blocks in owned), len(set.union(*owned)), "a block is owned twice")
        mlp = _wide_mlp()
        single = DistributedShampoo(mlp.parameters(), max_preconditioner_dim=32)
        expected = {(name, key) for name, param in mlp.named_parameters() for key in single.state[param] if key != "step"}
        self.assertEqual(len(expected), 68)
        self.assertEqual(set.union(*owned), expected)
        # Optimizer state per rank within 10% of an even share.
        total = sum(report["state_bytes"] for report in reports)
        for report in reports:
            self.assertLess(abs(report["state_bytes"] - total / world_size), 0.1 * total / world_size)
        # One step moves at most the owned blocks' gradients in and this rank's shard of updates
        # in (and the reverse out): no rank gathers a parameter or gradient.
        for report in reports:
            self.assertLessEqual(report["received"], report["owned_block_bytes"] + report["shard_bytes"])
            self.assertLessEqual(report["sent"], report["owned_block_bytes"] + report["shard_bytes"])
            self.assertGreater(report["received"], 0)

    def test_misuse_is_refused_on_every_rank(self) -> None:
        run_on_ranks(2, refuse_bad_input)

    def test_moves_between_fully_shard_and_ddp_both_ways(self) -> None:
        # FSDP2 on 4 ranks -> DDP on 2 ranks, which saves again -> FSDP2 on 3 ranks.
        ddp_out, ddp_checkpoint = self.path("to_ddp"), self.path("ddp_ckpt")
        run_on_ranks(
            2, train, Run("ddp", ddp_out, save_dir=ddp_checkpoint, save_at=LATER_SAVE_AT, resume_dir=self.path("ckpt4"))
        )
        self.assertSameTrajectory(read_result(ddp_out), from_step=SAVE_AT)
        back_out = self.path("back_to_fsdp")
        run_on_ranks(3, train, Run("fsdp", back_out, resume_dir=ddp_checkpoint, resume_at=LATER_SAVE_AT))
        self.assertSameTrajectory(read_result(back_out), from_step=LATER_SAVE_AT)


if __name__ == "__main__":
    unittest.main()
