# pyre-strict
"""DistributedShampoo under FSDP2 (``FullyShardDistributedConfig``) against DDP
(``DDPDistributedConfig``) on the same model and ranks: step time, bytes communicated per step,
and memory per rank.

    python -m benchmarks.fully_shard_benchmark [--ranks 4] [--steps 20] [--width 1024] [--max-dim 128]

Each rank runs on one thread. The gradients come from one backward pass and stay fixed, so only
``optimizer.step()`` is timed: after two warm-up steps, each timed step starts at a barrier and
its time is the slowest rank's; the table gives the mean. Roots are computed every 10 steps, so
20 timed steps include two root computations per block. Bytes are what each rank sent plus
received, as ``bytes_communicated()`` counts them (the all-gather of updates under DDP; the
gradient pieces to the owners and the update pieces back under FSDP2). The optimizer state per
rank is the bytes of its blocks' state, against an even share of the total.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from distributed_shampoo import (
    AdamPreconditionerConfig,
    DDPDistributedConfig,
    DistributedShampoo,
    FullyShardDistributedConfig,
)
from distributed_shampoo.checkpoint.plan import local_data
from distributed_shampoo.launch import run_on_ranks
from distributed_shampoo.utils.shampoo_checkpoint_utils import flatten

PRECONDITION_FREQUENCY = 10


def _model(width: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(width // 2, width), torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU(),
        torch.nn.Linear(width, 10),
    )


def measure(rank: int, world_size: int, mode: str, width: int, max_dim: int, steps: int, out: str) -> None:
    """Times ``steps`` optimizer steps of ``mode`` ("ddp" or "fsdp"); rank 0 writes the figures."""
    torch.set_num_threads(1)
    model = _model(width)
    if mode == "fsdp":
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model.children():
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = DistributedShampoo(
        model.parameters(), lr=1e-3, betas=(0.9, 0.999), epsilon=1e-8, momentum=0.9, max_preconditioner_dim=max_dim,
        precondition_frequency=PRECONDITION_FREQUENCY, grafting_config=AdamPreconditionerConfig(),
        distributed_config=FullyShardDistributedConfig() if mode == "fsdp" else DDPDistributedConfig(),
    )
    inputs = torch.randn(32, width // 2, generator=torch.Generator().manual_seed(1))
    model(inputs).square().mean().backward()
    for _ in range(2):
        optimizer.step()
    sent_before, received_before = optimizer.bytes_communicated()
    times: list[float] = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        optimizer.step()
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    sent, received = optimizer.bytes_communicated()
    state = optimizer.distributed_state_dict(model.named_parameters(), save_param_groups=False, layout="nested")["state"]
    assert isinstance(state, dict)
    mine = {
        "traffic": (sent - sent_before + received - received_before) / steps,
        "state": sum(
            value.nbytes for key, value in flatten(state).items() if isinstance(value, torch.Tensor) and json.loads(key)[-1] != "step"
        ),
        "params_and_grads": sum(local_data(p).nbytes * 2 for p in model.parameters()),
    }
    reports: list[object] = [None for _ in range(world_size)]
    dist.all_gather_object(reports, mine)
    if rank == 0:
        Path(out).write_text(json.dumps({"step_ms": statistics.mean(times) * 1e3, "ranks": reports}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--max-dim", type=int, default=128)
    args = parser.parse_args()
    ranks, width, max_dim, steps = int(args.ranks), int(args.width), int(args.max_dim), int(args.steps)
    params = sum(p.numel() for p in _model(width).parameters())
    blocks = sum(
        1 for state in DistributedShampoo(_model(width).parameters(), max_preconditioner_dim=max_dim).state.values()
        for key in state if key != "step"
    )
    print(
        f"MLP {width // 2}-{width}-{width}-10 ({params / 1e6:.2f} M parameters, {blocks} blocks at max_preconditioner_dim "
        f"{max_dim}), {ranks} gloo ranks of 1 thread, mean of {steps} steps, roots every {PRECONDITION_FREQUENCY} steps"
    )
    print(
        "| config | step (ms) | bytes sent + received per rank per step (mean / max) | optimizer state per rank, "
        "max vs an even share | parameters + gradients per rank |\n|---|---:|---:|---:|---:|"
    )
    step_ms: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, label in (("ddp", "DDPDistributedConfig()"), ("fsdp", "FullyShardDistributedConfig()")):
            out = str(Path(tmp, mode))
            run_on_ranks(ranks, measure, mode, width, max_dim, steps, out, timeout_s=1800.0)
            result = json.loads(Path(out).read_text())
            step_ms[mode], reports = float(result["step_ms"]), result["ranks"]
            traffic = [float(report["traffic"]) for report in reports]
            state = [int(report["state"]) for report in reports]
            share = sum(state) / ranks
            print(
                f"| {label} | {step_ms[mode]:.1f} | {statistics.mean(traffic) / 2**20:.2f} MiB / "
                f"{max(traffic) / 2**20:.2f} MiB | {max(state) / 2**20:.2f} MiB vs {share / 2**20:.2f} MiB "
                f"({(max(state) / share - 1) * 100:+.2f}%) | {max(int(r['params_and_grads']) for r in reports) / 2**20:.2f} MiB |"
            )
    print(f"\nFSDP2 step time / DDP step time: {step_ms['fsdp'] / step_ms['ddp']:.2f}x")


if __name__ == "__main__":
    main()
