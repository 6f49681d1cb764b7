# pyre-strict
"""Runs a function on N local processes joined by a gloo process group, and never hangs.

Used by the tests, the benchmarks and the examples to exercise real multi-rank behaviour on one
machine.

Each rank is a spawned process that rendezvouses through a ``file://`` store in a fresh temporary
directory. Collectives time out after ``collective_timeout_s``; the parent kills ranks still alive
after ``timeout_s`` and fails with every rank's traceback.
"""

import ctypes
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Asks Linux to SIGKILL this rank when the launching process dies, so that a killed test or
    benchmark leaves no rank running (``daemon=True`` only covers a parent that exits normally)."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the call
        os._exit(1)


def _child(
    fn: Callable[..., None], rank: int, world_size: int, store: str, errors: str, args: tuple[object, ...],
    collective_timeout_s: float,
) -> None:
    _die_with_parent()
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=collective_timeout_s),
        )
        # Every rank is connected to every other before any starts: a rank whose work needs no
        # collective (a load) could otherwise finish and exit while a slower one is still
        # connecting to it, which fails that one ("Gloo connectFullMesh failed ... closed by peer").
        dist.barrier()
        try:
            fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
    except BaseException:
        Path(errors, f"rank{rank}.txt").write_text(traceback.format_exc())
        os._exit(1)
    # The work and the process group's teardown succeeded. Skip interpreter finalisation: there,
    # torch's C++ threads occasionally abort the process ("terminate called without an active
    # exception", exit code -6), which would turn a rank that finished its work into a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(
    world_size: int,
    fn: Callable[..., None],
    *args: object,
    timeout_s: float = 180.0,
    collective_timeout_s: float = 60.0,
) -> None:
    """Calls ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks.

    ``fn`` and ``args`` must be picklable (a module-level function, plain data, paths).

    Raises:
        AssertionError: If any rank raised, exited non-zero or ran past ``timeout_s``; the message
            holds each failing rank's traceback.
    """
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as scratch:
        store, errors = os.path.join(scratch, "store"), os.path.join(scratch, "errors")
        os.mkdir(errors)
        processes = [
            context.Process(
                target=_child, args=(fn, rank, world_size, store, errors, args, collective_timeout_s), daemon=True
            )
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout_s
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        failures: list[str] = []
        for rank, process in enumerate(processes):
            if process.is_alive():
                process.kill()
                process.join(10)
                failures.append(f"rank {rank}: still running after {timeout_s:.0f}s, killed")
            elif process.exitcode != 0:
                report = Path(errors, f"rank{rank}.txt")
                detail = report.read_text() if report.exists() else "(no traceback: the process died)"
                failures.append(f"rank {rank}: exit code {process.exitcode}\n{detail}")
        if failures:
            raise AssertionError(f"{fn.__name__} failed on {world_size} ranks:\n" + "\n".join(failures))
