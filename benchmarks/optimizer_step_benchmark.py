# pyre-strict
"""Optimizer step time of DistributedShampoo against torch.optim.Adam on the same model.

    python -m benchmarks.optimizer_step_benchmark [--steps 20] [--threads 2]

Information, not a target: Shampoo does more work per step (factor updates every step, an
eigendecomposition per factor every ``precondition_frequency`` steps). Times only
``optimizer.step()`` (gradients are fixed random tensors): the mean over ``--steps`` steps after
two warm-up steps, so root computations are amortised; one process on the CPU.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from distributed_shampoo import AdamPreconditionerConfig, DistributedShampoo


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10))


def _mean_step_ms(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], steps: int) -> float:
    params = list(_model().parameters())
    for param in params:
        param.grad = torch.randn_like(param) * 1e-2
    optimizer = make(params)
    for _ in range(2):
        optimizer.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.mean(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(int(args.threads))
    grafting = AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8)
    candidates: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
        "torch.optim.Adam": lambda p: torch.optim.Adam(p, lr=1e-3),
        "Shampoo, blocks 1024, roots every step": lambda p: DistributedShampoo(p, lr=1e-3, grafting_config=grafting),
        "Shampoo, blocks 1024, roots every 10 steps": lambda p: DistributedShampoo(
            p, lr=1e-3, grafting_config=grafting, precondition_frequency=10
        ),
        "Shampoo, blocks 256, roots every step": lambda p: DistributedShampoo(
            p, lr=1e-3, grafting_config=grafting, max_preconditioner_dim=256
        ),
        "Shampoo, blocks 256, roots every 10 steps": lambda p: DistributedShampoo(
            p, lr=1e-3, grafting_config=grafting, max_preconditioner_dim=256, precondition_frequency=10
        ),
    }
    params = sum(p.numel() for p in _model().parameters())
    print(f"MLP 512-1024-1024-10 ({params / 1e6:.2f} M parameters), {args.threads} threads, mean of {args.steps} steps")
    print("| optimizer | step (ms) | vs Adam |\n|---|---:|---:|")
    adam = 0.0
    for name, make in candidates.items():
        milliseconds = _mean_step_ms(make, int(args.steps))
        adam = adam or milliseconds
        print(f"| {name} | {milliseconds:.1f} | {milliseconds / adam:.1f}x |")
    print("\n| one eigh of a 1024 x 1024 factor | ms |\n|---|---:|")
    for dtype in (torch.float64, torch.float32):
        print(f"| {dtype} | {_eigh_ms(dtype):.1f} |")


def _eigh_ms(dtype: torch.dtype) -> float:
    """The best of 3 symmetric eigendecompositions of a 1024 x 1024 factor-like matrix."""
    grad = torch.randn(1024, 1024, dtype=dtype)
    factor = grad @ grad.T
    times = []
    for _ in range(3):
        start = time.perf_counter()
        torch.linalg.eigh(factor)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


if __name__ == "__main__":
    main()
