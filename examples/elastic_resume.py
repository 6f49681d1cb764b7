# pyre-strict
"""The README's main job: train with Distributed Shampoo on 4 ranks, stop, resume on 2 and on 3.

A small classifier trains data-parallel on synthetic data on gloo ranks; Shampoo's blocks are
distributed over the ranks (``DDPDistributedConfig``: each rank keeps and updates only its own
blocks). The 4-rank job saves model and optimizer state every 5 steps through a
``CheckpointManager`` with asynchronous saves (training blocks only while the state is staged;
every rank writes its own blocks in the background; the last 2 checkpoints are kept), and stops
after ``--stop-at`` steps. The job then resumes from the latest checkpoint on 2 ranks and on 3
ranks: each rank builds the optimizer, takes its ``distributed_state_dict()`` as template, and
``load_latest`` reads only the blocks that rank now owns. The tables compare the losses and final
parameters with a run that was never interrupted, and with a resume that restores the model but
not the optimizer (what happens without an optimizer checkpoint).

Gradients are averaged in a fixed order whatever the world size (each rank computes the gradients
of its micro-batches, they are all-gathered and summed in micro-batch order), so an exact resume
reproduces the uninterrupted run bit for bit. With DistributedDataParallel's all-reduce the sums
would be rounded differently at each world size and the runs would agree to float rounding only.
"""

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from distributed_shampoo import AdamPreconditionerConfig, DDPDistributedConfig, DistributedShampoo
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
    """

    total_steps: int
    out: str
    checkpoint_root: str | None = None
    save_every: int | None = None
    resume: bool = False
    resume_optimizer: bool = True


def _micro_batch(step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``index`` of step ``step``; the labels come from a fixed random teacher."""
    teacher = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(0))
    inputs = torch.randn(MICRO_BATCH_SIZE, FEATURES, generator=torch.Generator().manual_seed(step * MICRO_BATCHES + index + 1))
    return inputs, (inputs @ teacher).argmax(dim=1)


def _forward_backward(model: torch.nn.Module, step: int, rank: int, world_size: int) -> float:
    """Sets every parameter's gradient to the mean over the step's micro-batches; returns the loss.

    Each rank computes its micro-batches' gradients; they are all-gathered and summed in
    micro-batch order, so the result is the same bits at every world size.
    """
    params = list(model.parameters())
    per_rank = MICRO_BATCHES // world_size
    local_grads, local_losses = [], []
    for index in range(rank * per_rank, (rank + 1) * per_rank):
        inputs, labels = _micro_batch(step, index)
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        local_grads.append(torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None]))
        local_losses.append(loss.detach().reshape(1))
    local = torch.stack([torch.cat([grad, loss]) for grad, loss in zip(local_grads, local_losses)])
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    mean = torch.cat(gathered).sum(dim=0) / MICRO_BATCHES
    offset = 0
    for param in params:
        param.grad = mean[offset : offset + param.numel()].view_as(param).clone()
        offset += param.numel()
    return float(mean[-1])


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    )


def _optimizer(model: torch.nn.Module) -> DistributedShampoo:
    return DistributedShampoo(
        model.parameters(), lr=0.003, betas=(0.9, 0.999), epsilon=1e-8, momentum=0.5, weight_decay=1e-4,
        max_preconditioner_dim=32, precondition_frequency=5, grafting_config=AdamPreconditionerConfig(beta2=0.999),
        distributed_config=DDPDistributedConfig(),
    )


def train(rank: int, world_size: int, phase: Phase) -> None:
    """Runs one phase on this rank; rank 0 reports progress and writes the results."""
    torch.set_num_threads(1)  # several ranks share this machine's cores
    model = _model()
    optimizer = _optimizer(model)
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
        losses[step + 1] = _forward_backward(model, step, rank, world_size)
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
    if rank == 0:
        torch.save({"losses": losses, "params": model.state_dict()}, phase.out)


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
        root = str(Path(tmp, "checkpoints"))
        print(f"1. Train on 4 ranks for {total} steps without interruption (the reference)")
        started = time.perf_counter()
        run_on_ranks(4, train, Phase(total, str(Path(tmp, "uninterrupted"))))
        print(f"   done in {time.perf_counter() - started:.1f}s")
        print(f"2. Train on 4 ranks, checkpointing every {SAVE_EVERY} steps, and stop after step {stop_at}")
        started = time.perf_counter()
        run_on_ranks(4, train, Phase(stop_at, str(Path(tmp, "stopped")), root, save_every=SAVE_EVERY))
        print(f"   done in {time.perf_counter() - started:.1f}s")
        latest = CheckpointManager(root).latest()
        assert latest is not None
        index = read_checkpoint_index(latest.path)
        print(f"   latest checkpoint: {latest.path.name}, {len(index.weight_map)} tensors, "
              f"{index.total_size / 1024:.0f} KiB in {len(index.shard_files())} files")
        runs: dict[str, tuple[dict[int, float], dict[str, torch.Tensor]]] = {}
        resumes = [("resumed on 2 ranks", 2, True), ("resumed on 3 ranks", 3, True), ("2 ranks, model only", 2, False)]
        for number, (label, world_size, with_optimizer) in enumerate(resumes, start=3):
            what = "model and optimizer" if with_optimizer else "the model only (fresh optimizer state)"
            print(f"{number}. Resume {what} from the latest checkpoint on {world_size} ranks and train to step {total}")
            started = time.perf_counter()
            out = str(Path(tmp, f"run{number}"))
            run_on_ranks(world_size, train, Phase(total, out, root, resume=True, resume_optimizer=with_optimizer))
            print(f"   done in {time.perf_counter() - started:.1f}s")
            runs[label] = _results(out)
        reference_losses, reference_params = _results(str(Path(tmp, "uninterrupted")))

    print("\n| step | 4 ranks, uninterrupted | " + " | ".join(runs) + " |")
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
    if not (identical["resumed on 2 ranks"] and identical["resumed on 3 ranks"]):
        print("\nFAILED: a resumed run does not reproduce the uninterrupted one")
        return 1
    print("\nOK: resuming on 2 or 3 ranks reproduces the 4-rank run exactly; without the optimizer state it does not.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
