# pyre-strict
"""Faults the checkpoint tests inject: a full disk on one rank, a save killed midway."""

import errno
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from distributed_shampoo.checkpoint import api as checkpoint_api

DISK_FULL_REPORT = "rank 1: OSError: [Errno 28] No space left on device"


def fill_disk_of_this_rank() -> None:
    """Makes every shard-file write of this process fail with ENOSPC."""

    def disk_full(*args: object, **kwargs: object) -> dict[str, str]:
        raise OSError(errno.ENOSPC, "No space left on device")

    checkpoint_api.write_safetensors = disk_full  # pyre-ignore[9]: fault injection.


def sigkill_while_staging(target: Callable[..., None], args: tuple[str, ...], started: Path, staging: str) -> int | None:
    """Runs ``target(*args)`` in a spawned process and SIGKILLs it while it writes a checkpoint.

    Waits (at most 120 s) until ``started`` exists, then until a directory matching the glob
    ``staging`` exists (a save is writing); returns the process's exit code.
    """
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        while not list(started.parent.glob(staging)) and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.join(30)
    return process.exitcode


def flip_last_byte(path: Path) -> None:
    """Corrupts a file's last byte (a shard file's last tensor then fails its checksum)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
