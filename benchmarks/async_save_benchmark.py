# pyre-strict
"""How long an asynchronous save blocks training, against a synchronous save, DCP's async_save,
and a plain copy of the same bytes (the floor for staging), in one run.

State: the checkpoint benchmark's Shampoo-like block-owned state with 512-wide blocks (~460 MiB
in 798 tensors over the ranks). Every time is barrier to barrier on ``--ranks`` gloo ranks, so
the slowest rank counts; the median of ``--repeats`` is reported. The first ``save_async`` of a
checkpointer allocates its staging buffers, later ones reuse them: both are reported.

    python -m benchmarks.async_save_benchmark --repeats 5
"""

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from benchmarks.checkpoint_benchmark import _leaves, _timed, shampoo_state
from distributed_shampoo.checkpoint import AsyncCheckpointer, CheckpointFuture, save_checkpoint
from distributed_shampoo.launch import run_on_ranks

WIDTH = 512


def _mean_step(stop: Callable[[], bool], at_least: int) -> float:
    """Mean time of a CPU-bound stand-in for a training step (small matmuls driven from Python),
    over at least ``at_least`` steps and until ``stop()``."""
    weight = torch.randn(256, 256)
    times: list[float] = []
    while len(times) < at_least or not stop():
        start = time.perf_counter()
        activation = torch.randn(64, 256)
        for _ in range(20):
            activation = torch.tanh(activation @ weight)
        times.append(time.perf_counter() - start)
    return statistics.mean(times)


def bench(rank: int, world_size: int, root: str, repeats: int, results: str) -> None:
    torch.set_num_threads(1)  # one core per rank for the stand-in training step
    state = shampoo_state(WIDTH, world_size, rank)
    leaves = _leaves(state)
    copies = [torch.empty_like(leaf) for leaf in leaves]
    times: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    checkpointer = AsyncCheckpointer()
    for repeat in range(repeats):
        record("plain copy of the same bytes", _timed(lambda: [c.copy_(t) for c, t in zip(copies, leaves)]))
        record("training step, no save running", _mean_step(lambda: True, 20))
        futures: list[CheckpointFuture] = []
        blocking = _timed(lambda: futures.append(checkpointer.save_async(Path(root, f"async-{repeat}"), state)))
        record("save_async, first call (allocates buffers)" if repeat == 0 else "save_async, buffers reused", blocking)
        start = time.perf_counter()
        record("training step, save running in the background", _mean_step(futures[0].done, 1))
        checkpointer.wait()
        dist.barrier()
        record("save_async, until durable (training steps running meanwhile)", blocking + time.perf_counter() - start)
        pending: list[object] = []
        record("save_checkpoint (synchronous)", _timed(lambda: save_checkpoint(Path(root, f"sync-{repeat}"), state)))
        record(
            "dcp.async_save, blocking part",
            _timed(lambda: pending.append(dcp.async_save(state, checkpoint_id=str(Path(root, f"dcp-{repeat}"))))),
        )
        dcp_future = pending[0]
        assert isinstance(dcp_future, Future), dcp_future  # without an async stager, a plain Future
        dcp_future.result()
        dist.barrier()
    checkpointer.close()
    if rank == 0:
        Path(results).write_text(json.dumps(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        results = str(Path(root, "results.json"))
        run_on_ranks(int(args.ranks), bench, root, int(args.repeats), results, timeout_s=1800.0, collective_timeout_s=600.0)
        times: dict[str, list[float]] = json.loads(Path(results).read_text())
    nbytes = sum(t.nbytes for r in range(args.ranks) for t in _leaves(shampoo_state(WIDTH, args.ranks, r)))
    copy = statistics.median(times["plain copy of the same bytes"])
    print(f"{nbytes / 2**20:.0f} MiB on {args.ranks} ranks, median of {args.repeats} (first call: 1 run)")
    print("| what | seconds | x plain copy |\n|---|---:|---:|")
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"| {name} | {seconds:.4f} | {seconds / copy:.2f} |")


if __name__ == "__main__":
    main()
