# pyre-strict
"""DistributedShampoo on real gloo ranks: the same trajectory at every world size, elastic resume."""

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from parameterized import parameterized, parameterized_class
from torch.nn.parallel import DistributedDataParallel

from distributed_shampoo import (
    AdamPreconditionerConfig,
    DDPDistributedConfig,
    DefaultShampooConfig,
    DefaultSOAPConfig,
    DistributedShampoo,
    EigendecomposedShampooPreconditionerConfig,
    PreconditionerConfig,
    SignDescentPreconditionerConfig,
    SpectralDescentPreconditionerConfig,
)
from distributed_shampoo.launch import run_on_ranks
from tests.trajectories import load_training_state, read_result, save_training_state, TrajectoryTestCase

STEPS = 8
SAVE_AFTER = 4  # steps taken before the checkpoint


@dataclass(frozen=True)
class Run:
    """One training run of the toy problem on ``world_size`` ranks (0: a single process)."""

    world_size: int
    out: str  # rank 0 writes the losses and final parameters here
    save_dir: str | None = None  # save a checkpoint after SAVE_AFTER steps
    resume_dir: str | None = None  # start from this checkpoint instead of from scratch
    num_trainers_per_group: int = -1
    communication_dtype: torch.dtype = torch.float32
    communicate_params: bool = False
    preconditioner: str = "root_inv"  # or "eigendecomposed", "sign_descent", "soap", "spectral_descent"


def _model(bias: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, bias=bias), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(36, 10, bias=bias), torch.nn.Tanh(),
        torch.nn.Linear(10, 3, bias=bias),
    )


def _optimizer(model: torch.nn.Module, run: Run) -> DistributedShampoo:
    distributed = (
        DDPDistributedConfig(run.num_trainers_per_group, run.communication_dtype, run.communicate_params) if run.world_size > 0 else None
    )
    return DistributedShampoo(
        model.parameters(), lr=0.05, betas=(0.9, 0.999), epsilon=1e-8, momentum=0.5, weight_decay=1e-3,
        max_preconditioner_dim=math.inf if run.preconditioner in _MATRICES_ONLY else 8, precondition_frequency=2, grafting_config=AdamPreconditionerConfig(beta2=0.999),
        distributed_config=distributed,
        preconditioner_config=_PRECONDITIONERS[run.preconditioner],
    )


_PRECONDITIONERS: dict[str, PreconditionerConfig] = {
    "root_inv": DefaultShampooConfig,
    "eigendecomposed": EigendecomposedShampooPreconditionerConfig(),
    "sign_descent": SignDescentPreconditionerConfig(),
    "soap": DefaultSOAPConfig,
    "spectral_descent": SpectralDescentPreconditionerConfig(),
}
# Spectral descent takes matrices only: its model has no biases, its blocks are whole matrices.
_MATRICES_ONLY: frozenset[str] = frozenset({"spectral_descent"})


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 32 samples of step ``step``; the labels come from a fixed random linear teacher."""
    teacher = torch.randn(50, 3, generator=torch.Generator().manual_seed(7))
    inputs = torch.randn(32, 2, 5, 5, generator=torch.Generator().manual_seed(1000 + step))
    return inputs, (inputs.flatten(1) @ teacher).argmax(dim=1)


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    """The loss of the full batch of step ``step``, the same on every rank (so gradients are
    bit-identical)."""
    inputs, targets = _batch(step)
    return torch.nn.functional.cross_entropy(model(inputs), targets)


def train_with_ddp(rank: int, world_size: int, out: str) -> None:
    """Data-parallel training: DistributedDataParallel averages the gradients of each rank's share
    of the batch; rank 0 writes the final parameters after checking every rank holds the same."""
    model = _model()
    ddp = DistributedDataParallel(model)
    optimizer = _optimizer(model, Run(world_size, out))
    for step in range(STEPS):
        inputs, targets = _batch(step)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(ddp(inputs[rank::world_size]), targets[rank::world_size]).backward()
        optimizer.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(other, flat) for other in gathered), "ranks hold different parameters"
    if rank == 0:
        torch.save({"losses": [], "params": model.state_dict()}, out)


def train(rank: int, world_size: int, run: Run) -> None:
    """Trains STEPS steps (or the rest of them after resuming); rank 0 writes the trajectory."""
    model = _model(bias=run.preconditioner not in _MATRICES_ONLY)
    optimizer = _optimizer(model, run)
    first_step = 0
    if run.resume_dir is not None:
        load_training_state(run.resume_dir, model, optimizer)
        first_step = SAVE_AFTER
    losses: list[float] = []
    for step in range(first_step, STEPS):
        if step == SAVE_AFTER and run.save_dir is not None:
            save_training_state(run.save_dir, model, optimizer)
        optimizer.zero_grad()
        loss = _loss(model, step)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    if rank == 0:
        torch.save({"losses": losses, "params": model.state_dict()}, run.out)


class DistributedTrainingTest(TrajectoryTestCase):
    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        out = cls.path("single")
        train(0, 1, Run(0, out))
        cls.reference = read_result(out)
        for world_size in (4, 2):
            run_on_ranks(world_size, train, Run(world_size, cls.path(f"world{world_size}"), save_dir=cls.path(f"ckpt{world_size}")))

    def test_reference_trains(self) -> None:
        losses = self.reference[0]
        self.assertEqual(len(losses), STEPS)
        self.assertLess(float(sum(losses[SAVE_AFTER:])), float(sum(losses[:SAVE_AFTER])))

    @parameterized.expand([(2,), (4,)])
    def test_world_size_follows_the_single_process_trajectory(self, world_size: int) -> None:
        self.assertSameTrajectory(read_result(self.path(f"world{world_size}")))

    def test_three_ranks_follow_the_single_process_trajectory(self) -> None:
        out = self.path("world3")
        run_on_ranks(3, train, Run(3, out))
        self.assertSameTrajectory(read_result(out))

    def test_each_rank_saved_only_its_own_blocks(self) -> None:
        index = json.loads(Path(self.path("ckpt4"), "optimizer.safetensors.index.json").read_text())
        block_files: dict[str, set[str]] = {}
        for name, file in index["weight_map"].items():
            key = json.loads(name.split("#")[0])
            if key[0] == "optimizer" and key[1] == "state" and key[3].startswith("block_"):
                block_files.setdefault(f"{key[2]}/{key[3]}", set()).add(file)
        model = _model()
        single = _optimizer(model, Run(0, ""))
        expected_blocks = {
            f"{name}/{key}" for name, param in model.named_parameters() for key in single.state[param] if key.startswith("block_")
        }
        self.assertEqual(set(block_files), expected_blocks)
        self.assertTrue(all(len(files) == 1 for files in block_files.values()))
        self.assertEqual(len(set.union(*block_files.values())), 4)

    @parameterized.expand([(4, 2), (4, 3), (2, 4)])
    def test_elastic_resume_continues_the_uninterrupted_trajectory(self, saved_on: int, resumed_on: int) -> None:
        out = self.path(f"resume{saved_on}to{resumed_on}")
        run_on_ranks(resumed_on, train, Run(resumed_on, out, resume_dir=self.path(f"ckpt{saved_on}")))
        self.assertSameTrajectory(read_result(out), from_step=SAVE_AFTER)

    def test_groups_of_two_trainers_on_four_ranks(self) -> None:
        out = self.path("groups")
        run_on_ranks(4, train, Run(4, out, num_trainers_per_group=2))
        self.assertSameTrajectory(read_result(out))

    def test_communicating_the_updated_parameters_follows_the_same_trajectory(self) -> None:
        # The owner's addition is the one every rank makes otherwise: bit for bit the same.
        out = self.path("communicate_params")
        run_on_ranks(3, train, Run(3, out, communicate_params=True))
        self.assertSameTrajectory(read_result(out))

    def test_distributed_data_parallel_gradients_agree_to_float_rounding(self) -> None:
        out = self.path("ddp")
        run_on_ranks(2, train_with_ddp, out)
        _, params = read_result(out)
        # The all-reduce rounds differently from one process's sum, and Shampoo's inverse roots
        # (epsilon 1e-8) amplify that: when this test was written, the runs differed by up to 0.12%
        # of how far training moved a tensor; allow 1%.
        initial = _model().state_dict()
        for name, value in self.reference[1].items():
            moved = float((value - initial[name]).abs().max())
            self.assertLess(float((params[name] - value).abs().max()), 1e-2 * moved, name)

    def test_bfloat16_communication_stays_close(self) -> None:
        out = self.path("bf16")
        run_on_ranks(2, train, Run(2, out, communication_dtype=torch.bfloat16))
        losses, params = read_result(out)
        torch.testing.assert_close(losses, self.reference[0], rtol=2e-2, atol=0)
        for name, value in self.reference[1].items():
            torch.testing.assert_close(params[name], value, rtol=0, atol=5e-2)


@parameterized_class(("preconditioner",), [("eigendecomposed",), ("sign_descent",), ("soap",), ("spectral_descent",)])
class PreconditionerConfigTrainingTest(TrajectoryTestCase):
    """The state of the other preconditioners (eigenvectors and eigenvalues; none for sign and
    spectral descent) reshards like the roots."""

    preconditioner: str = ""

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        out = cls.path("single")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sign descent's hyperparameters without effect
            train(0, 1, Run(0, out, preconditioner=cls.preconditioner))
        cls.reference = read_result(out)
        run_on_ranks(4, train, Run(4, cls.path("world4"), save_dir=cls.path("ckpt4"), preconditioner=cls.preconditioner))

    def test_four_ranks_follow_the_single_process_trajectory(self) -> None:
        self.assertSameTrajectory(read_result(self.path("world4")))

    @parameterized.expand([(4, 2), (4, 3)])
    def test_elastic_resume_continues_the_uninterrupted_trajectory(self, saved_on: int, resumed_on: int) -> None:
        out = self.path(f"resume{saved_on}to{resumed_on}")
        run_on_ranks(resumed_on, train, Run(resumed_on, out, resume_dir=self.path(f"ckpt{saved_on}"), preconditioner=self.preconditioner))
        self.assertSameTrajectory(read_result(out), from_step=SAVE_AFTER)
