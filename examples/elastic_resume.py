# pyre-strict
"""The README's main job: train with Distributed Shampoo on 4 ranks, stop, resume on 2 and on 3,
under DDP and under FSDP2.

A small classifier trains data-parallel on synthetic data on gloo ranks; Shampoo's blocks are
distributed over the ranks (``DDPDistributedConfig``: each rank keeps and updates only its own
blocks). The 4-rank job saves model and optimizer state every 5 steps through a
``CheckpointManager`` with asynchronous saves (training blocks only while the state is staged;
every rank writes its own blocks in the background; the last 2 checkpoints are kept), and stops
after ``--stop-at`` steps. The job then resumes from the latest checkpoint on 2 ranks and on 3
ranks: each rank builds the optimizer, takes its ``distributed_state_dict()`` as template, and
``load_latest`` reads only the blocks that rank now owns. The tables compare the losses and final
parameters with a run that was never interrupted, and with a resume that restores the model but
not the optimizer (what happens without an optimizer checkpoint). Then the same job runs under
FSDP2 (``fully_shard``, ``FullyShardDistributedConfig``: parameters, gradients and Shampoo's
blocks all sharded): it stops on 4 ranks and resumes on 3, and lands on the same bits as the DDP
runs.

Gradients are summed in micro-batch order whatever the world size, so an exact resume reproduces
the uninterrupted run bit for bit. Under DDP each rank computes the gradients of its
micro-batches, and they are all-gathered. Under FSDP2 every rank computes every micro-batch, and
FSDP2 averages the identical gradients in float64, which is exact. (With DistributedDataParallel's
all-reduce or FSDP2's reduce-scatter of different micro-batches, the sums would be rounded
differently at each world size and the runs would agree to float rounding only.)
"""

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from distributed_shampoo import (
    AdamPreconditionerConfig,
    DDPDistributedConfig,
    DistributedShampoo,
    FullyShardDistributedConfig,
)
from distributed_shampoo.checkpoint import CheckpointManager, read_checkpoint_index, RetentionPolicy
from distributed_shampoo.launch import run_on_ranks

SAVE_EVERY = 5
MICRO_BATCHES, MICRO_BATCH_SIZE = 12, 16  # 12 micro-batches split evenly over 1, 2, 3 or 4 ranks
FEATURES, HIDDEN, CLASSES = 32, 64, 4


@dataclass(frozen=True)
class Phase:
    """One launch of the job.

    Attributes:
        total_steps: Train until this many steps are done.
        out: Rank 0 writes the per-step losses and the final parameters here.
        checkpoint_root: The ``CheckpointManager``'s root, or None for a run without checkpoints.
        save_every: Save asynchronously every this many steps (None: never).
        resume: Start from the manager's latest checkpoint instead of from scratch.
        resume_optimizer: Also restore the optimizer's state (False: the model only).
        fully_shard: Train under FSDP2 instead of DDP.
    """

    total_steps: int
    out: str
    checkpoint_root: str | None = None
    save_every: int | None = None
    resume: bool = False
    resume_optimizer: bool = True
    fully_shard: bool = False


def _micro_batch(step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``index`` of step ``step``; the labels come from a fixed random teacher."""
    teacher = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(0))
    inputs = torch.randn(MICRO_BATCH_SIZE, FEATURES, generator=torch.Generator().manual_seed(step * MICRO_BATCHES + index + 1))
    return inputs, (inputs @ teacher).argmax(dim=1)


def _forward_backward(model: torch.nn.Module, step: int, micro_batches: range) -> torch.Tensor:
    """Each parameter's gradient (in parameter order) and the loss, for each of ``micro_batches``:
    a ``(len(micro_batches), numel + 1)`` tensor. Under FSDP2 the gradients are this rank's shards."""
    rows = []
    for index in micro_batches:
        inputs, labels = _micro_batch(step, index)
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        rows.append(torch.cat([_local(p.grad).reshape(-1) for p in model.parameters()] + [loss.detach().reshape(1)]))
    return torch.stack(rows)


def _set_mean_gradient(model: torch.nn.Module, step: int, rank: int, world_size: int, fully_sharded: bool) -> float:
    """Sets every parameter's gradient to the mean over the step's micro-batches, summed in
    micro-batch order; returns the mean loss. The result is the same bits at every world size."""
    if fully_sharded:
        per_micro_batch = _forward_backward(model, step, range(MICRO_BATCHES))
    else:
        per_rank = MICRO_BATCHES // world_size
        local = _forward_backward(model, step, range(rank * per_rank, (rank + 1) * per_rank))
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local)
        per_micro_batch = torch.cat(gathered)
    total = per_micro_batch[0].clone()
    for row in per_micro_batch[1:]:
        total += row
    mean = total / MICRO_BATCHES
    offset = 0
    for param in model.parameters():
        grad = _local(param.grad)
        grad.copy_(mean[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
    return float(mean[-1])


def _local(tensor: torch.Tensor | None) -> torch.Tensor:
    """This rank's part of a parameter's gradient (a DTensor's local shard)."""
    assert tensor is not None, "every parameter has a gradient after backward()"
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    )


def _fully_shard(model: torch.nn.Module, world_size: int) -> None:
    """FSDP2 over all ranks, one group for the whole (small) model; gradients are averaged in
    float64, so identical ones stay exact."""
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)), mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float64))


def _optimizer(model: torch.nn.Module, fully_sharded: bool) -> DistributedShampoo:
    return DistributedShampoo(
        model.parameters(), lr=0.003, betas=(0.9, 0.999), epsilon=1e-8, momentum=0.5, weight_decay=1e-4,
        max_preconditioner_dim=32, precondition_frequency=5, grafting_config=AdamPreconditionerConfig(beta2=0.999),
        distributed_config=FullyShardDistributedConfig() if fully_sharded else DDPDistributedConfig(),
    )


def train(rank: int, world_size: int, phase: Phase) -> None:
    """Runs one phase on this rank; rank 0 reports progress and writes the results."""
    torch.set_num_threads(1)  # several ranks share this machine's cores
    model = _model()
    if phase.fully_shard:
        _fully_shard(model, world_size)
    optimizer = _optimizer(model, phase.fully_shard)
    manager = (
        CheckpointManager(phase.checkpoint_root, RetentionPolicy(keep_last=2), async_save=True)
        if phase.checkpoint_root is not None
        else None
    )
    step = 0
    if phase.resume:
        assert manager is not None
        # The template is the state at this world size; load_latest fills its dicts in place,
        # reading only this rank's blocks.
        model_state = model.state_dict()
        optimizer_state = optimizer.distributed_state_dict(model.named_parameters())
        template: dict[str, object] = {"model": model_state}
        if phase.resume_optimizer:
            template["optimizer"] = optimizer_state
        loaded = manager.load_latest(template)
        assert loaded is not None, f"no checkpoint under {phase.checkpoint_root}"
        model.load_state_dict(model_state)
        if phase.resume_optimizer:
            optimizer.load_distributed_state_dict(optimizer_state, model.named_parameters())
        step = loaded.step
    losses: dict[int, float] = {}
    blocked = 0.0
    while step < phase.total_steps:
        losses[step + 1] = _set_mean_gradient(model, step, rank, world_size, phase.fully_shard)
        optimizer.step()
        step += 1
        if rank == 0 and step % 5 == 0:
            print(f"    [{world_size} ranks] step {step:3d}/{phase.total_steps}: loss {losses[step]:.4f}", flush=True)
        if manager is not None and phase.save_every is not None and step % phase.save_every == 0:
            start = time.perf_counter()
            state = {"model": model.state_dict(), "optimizer": optimizer.distributed_state_dict(model.named_parameters())}
            manager.save(step, state, metrics={"loss": losses[step]})  # returns once staged
            blocked += time.perf_counter() - start
    if manager is not None:
        manager.close()  # waits for the save in flight
        if rank == 0 and phase.save_every is not None:
            kept = [info.step for info in manager.checkpoints()]
            print(f"    [{world_size} ranks] saved every {phase.save_every} steps in the background "
                  f"(training blocked {blocked * 1e3:.0f} ms in all); kept steps {kept}", flush=True)
    # The whole parameters (gathering FSDP2's shards is a collective: every rank takes part).
    params = {
        name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()
        for name, value in model.state_dict().items()
    }
    if rank == 0:
        torch.save({"losses": losses, "params": params}, phase.out)


def _results(path: str) -> tuple[dict[int, float], dict[str, torch.Tensor]]:
    saved = torch.load(path)
    return saved["losses"], saved["params"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="total training steps")
    parser.add_argument("--stop-at", type=int, default=20, help="the step after which the 4-rank job stops (a multiple of 5)")
    args = parser.parse_args()
    total, stop_at = int(args.steps), int(args.stop_at)
    if stop_at % SAVE_EVERY or not 0 < stop_at < total:
        parser.error(f"--stop-at must be a multiple of {SAVE_EVERY} between 0 and --steps")
    model = _model()
    blocks = sum(len([k for k in state if k.startswith("block_")]) for state in DistributedShampoo(model.parameters(), max_preconditioner_dim=32).state.values())
    print(f"Model: {sum(p.numel() for p in model.parameters())} parameters in {blocks} Shampoo blocks (max_preconditioner_dim=32)")
    with tempfile.TemporaryDirectory() as tmp:
        print(f"1. Train on 4 ranks for {total} steps without interruption (DDP; the reference)")
        started = time.perf_counter()
        run_on_ranks(4, train, Phase(total, str(Path(tmp, "uninterrupted"))))
        print(f"   done in {time.perf_counter() - started:.1f}s")
        roots = {mode: str(Path(tmp, f"checkpoints-{mode}")) for mode in ("DDP", "FSDP2")}
        runs: dict[str, tuple[dict[int, float], dict[str, torch.Tensor]]] = {}
        # (label, ranks, restore the optimizer, under FSDP2); each mode first stops on 4 ranks.
        resumes = [
            ("DDP, resumed on 2 ranks", 2, True, False),
            ("DDP, resumed on 3 ranks", 3, True, False),
            ("DDP, 2 ranks, model only", 2, False, False),
            ("FSDP2, resumed on 3 ranks", 3, True, True),
        ]
        number = 2
        for label, world_size, with_optimizer, fully_sharded in resumes:
            mode = "FSDP2" if fully_sharded else "DDP"
            root = roots[mode]
            if CheckpointManager(root).latest() is None:
                print(f"{number}. Train on 4 ranks under {mode}, checkpointing every {SAVE_EVERY} steps, "
                      f"and stop after step {stop_at}")
                number += 1
                started = time.perf_counter()
                stopped = Phase(stop_at, str(Path(tmp, f"stopped-{mode}")), root, save_every=SAVE_EVERY, fully_shard=fully_sharded)
                run_on_ranks(4, train, stopped)
                print(f"   done in {time.perf_counter() - started:.1f}s")
                latest = CheckpointManager(root).latest()
                assert latest is not None
                index = read_checkpoint_index(latest.path)
                print(f"   latest checkpoint: {latest.path.name}, {len(index.weight_map)} tensors, "
                      f"{index.total_size / 1024:.0f} KiB in {len(index.shard_files())} files")
            what = "model and optimizer" if with_optimizer else "the model only (fresh optimizer state)"
            print(f"{number}. Resume {what} from the latest {mode} checkpoint on {world_size} ranks "
                  f"under {mode} and train to step {total}")
            number += 1
            started = time.perf_counter()
            out = str(Path(tmp, f"run{number}"))
            resumed = Phase(total, out, root, resume=True, resume_optimizer=with_optimizer, fully_shard=fully_sharded)
            run_on_ranks(world_size, train, resumed)
            print(f"   done in {time.perf_counter() - started:.1f}s")
            runs[label] = _results(out)
        reference_losses, reference_params = _results(str(Path(tmp, "uninterrupted")))

    print("\n| step | DDP, 4 ranks, uninterrupted | " + " | ".join(runs) + " |")
    print("|---:|---:|" + "---:|" * len(runs))
    for step in range(stop_at + 1, total + 1):
        if step in (stop_at + 1, total) or step % 5 == 0:
            row = [f"{reference_losses[step]:.6f}"] + [f"{losses[step]:.6f}" for losses, _ in runs.values()]
            print(f"| {step} | " + " | ".join(row) + " |")
    print("\n| run | max abs loss difference | max abs parameter difference | bit-identical to the uninterrupted run |")
    print("|---|---:|---:|---|")
    identical: dict[str, bool] = {}
    for label, (losses, params) in runs.items():
        loss_difference = max(abs(losses[s] - reference_losses[s]) for s in losses)
        param_difference = max(float((params[name] - value).abs().max()) for name, value in reference_params.items())
        identical[label] = losses == {s: reference_losses[s] for s in losses} and all(
            torch.equal(params[name], value) for name, value in reference_params.items()
        )
        print(f"| {label} | {loss_difference:.2e} | {param_difference:.2e} | {'yes' if identical[label] else 'no'} |")
    if not all(identical[label] for label, _, with_optimizer, _ in resumes if with_optimizer):
        print("\nFAILED: a resumed run does not reproduce the uninterrupted one")
        return 1
    print("\nOK: resuming on 2 or 3 ranks, under DDP or FSDP2, reproduces the 4-rank run exactly; "
          "without the optimizer state it does not.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
