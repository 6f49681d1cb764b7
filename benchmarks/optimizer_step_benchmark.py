# pyre-strict
"""Optimizer step time of DistributedShampoo against the reference implementation and torch.optim.Adam.

    python -m benchmarks.optimizer_step_benchmark --reference /path/to/optimizers [--steps 20] [--threads 1]

The same model, fixed random gradients and settings for both Shampoos (Adam grafting, blocks of
256 or 1024, roots every step or every 10 steps, float32 factors); each implementation runs in its
own process (both packages are ``distributed_shampoo``; the reference checkout, at ``18178f4``, is
put on ``PYTHONPATH`` of its process only, it is not a dependency). Times only
``optimizer.step()``: the mean over ``--steps`` steps after two warm-up steps, so root
computations are amortised; one process on the CPU. Without ``--reference`` only ours and Adam run.
This file imports nothing of ours at module level, since it also runs inside the reference's process.
"""

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

# name -> (max_preconditioner_dim, precondition_frequency)
CONFIGS: dict[str, tuple[int, int]] = {
    "blocks 1024, roots every step": (1024, 1),
    "blocks 1024, roots every 10 steps": (1024, 10),
    "blocks 256, roots every step": (256, 1),
    "blocks 256, roots every 10 steps": (256, 10),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10))


def _mean_step_ms(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], steps: int) -> float:
    params = list(_model().parameters())
    generator = torch.Generator().manual_seed(1)
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator) * 1e-2
    optimizer = make(params)
    for _ in range(2):
        optimizer.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.mean(times) * 1e3


def worker(threads: int, steps: int, out: str) -> None:
    """Times every config with the ``distributed_shampoo`` on this process's path (and Adam)."""
    package = importlib.import_module("distributed_shampoo")
    torch.set_num_threads(threads)
    grafting = package.AdamGraftingConfig(beta2=0.999, epsilon=1e-8)
    times = {"torch.optim.Adam": _mean_step_ms(lambda p: torch.optim.Adam(p, lr=1e-3), steps)}
    for name, (max_dim, frequency) in CONFIGS.items():
        times[name] = _mean_step_ms(
            lambda p: package.DistributedShampoo(
                p, lr=1e-3, grafting_config=grafting, max_preconditioner_dim=max_dim, precondition_frequency=frequency
            ),
            steps,
        )
    Path(out).write_text(json.dumps(times))


def _run(path: str, threads: int, steps: int, out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": path}
    command = [sys.executable, __file__, "--worker", str(threads), str(steps), str(out)]
    subprocess.run(command, env=env, check=True, capture_output=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", help="a checkout of facebookresearch/optimizers at 18178f4")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        threads, steps, out = args.worker
        worker(int(threads), int(steps), out)
        return
    with tempfile.TemporaryDirectory() as scratch:
        ours = _run(str(Path(__file__).resolve().parents[1]), args.threads, args.steps, Path(scratch, "ours.json"))
        reference = _run(args.reference, args.threads, args.steps, Path(scratch, "reference.json")) if args.reference else None
    params = sum(p.numel() for p in _model().parameters())
    print(f"MLP 512-1024-1024-10 ({params / 1e6:.2f} M parameters), {args.threads} threads, mean of {args.steps} steps, Adam grafting")
    print("| Shampoo | ours (ms) | reference (ms) | ours / reference | ours / Adam |\n|---|---:|---:|---:|---:|")
    adam = ours["torch.optim.Adam"]
    for name in CONFIGS:
        theirs = f"{reference[name]:.1f} | {ours[name] / reference[name]:.2f}x" if reference else "- | -"
        print(f"| {name} | {ours[name]:.1f} | {theirs} | {ours[name] / adam:.1f}x |")
    print(f"| (torch.optim.Adam) | {adam:.2f} | | | |")


if __name__ == "__main__":
    main()
