# pyre-strict
"""Faults the checkpoint tests inject: a full disk on one rank, a save killed midway."""

import errno
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from distributed_shampoo.checkpoint import api as checkpoint_api, AsyncCheckpointer, CheckpointError, DistributedSaveError
from distributed_shampoo.checkpoint.writer import start_safetensors

DISK_FULL_REPORT = "rank 1: OSError: [Errno 28] No space left on device"


def raising(error: BaseException) -> Callable[..., None]:
    """A stand-in for a function that raises ``error`` whatever it is called with."""

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    return fail


def kill_this_process(*args: object, **kwargs: object) -> None:
    """A stand-in for a function during which this process dies (SIGKILL)."""
    os.kill(os.getpid(), signal.SIGKILL)


def break_writes_of_this_rank(fault: Callable[..., None]) -> None:
    """Makes every shard-file write of this process run ``fault`` instead (which raises or dies)."""
    checkpoint_api.start_safetensors = fault  # pyre-ignore[9]: fault injection.


def fill_disk_of_this_rank() -> None:
    """Makes every shard-file write of this process fail with ENOSPC."""
    break_writes_of_this_rank(raising(OSError(errno.ENOSPC, "No space left on device")))


FSYNC_FAILED_REPORT = "rank 1: OSError: [Errno 5] Input/output error"


def fail_fsyncs_of_this_rank() -> None:
    """Makes every fsync of this process fail with EIO (after the bytes were written: the disk
    failed to persist them)."""
    os.fsync = raising(OSError(errno.EIO, "Input/output error"))


def restore_disk_of_this_rank() -> None:
    """Undoes ``fill_disk_of_this_rank``."""
    checkpoint_api.start_safetensors = start_safetensors


def fail_staging_copies(checkpointer: AsyncCheckpointer) -> None:
    """Makes every copy into ``checkpointer``'s staging buffers fail with MemoryError."""
    checkpointer._copy_to_staging_buffers = raising(MemoryError("out of pinned memory"))  # pyre-ignore[8]: fault injection.


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


def expect_failure_on_every_rank(
    rank: int,
    failing_rank: int,
    action: Callable[[], object],
    failing_error: Callable[[BaseException], bool],
    report: str,
    others: type[CheckpointError] = DistributedSaveError,
    within_s: float | None = None,
) -> None:
    """Runs ``action`` on this rank and checks that a failure on one rank reached every rank.

    ``failing_rank`` must raise an error (an interrupt too) that ``failing_error`` accepts; every
    other rank must raise an ``others`` whose message contains ``report``; with ``within_s``, all
    of it within that many seconds.
    """
    started = time.monotonic()
    try:
        action()
    except BaseException as error:
        if rank == failing_rank:
            assert failing_error(error), error
        else:
            assert isinstance(error, others) and report in str(error), error
    else:
        raise AssertionError(f"rank {rank}: the action did not fail")
    if within_s is not None:
        assert time.monotonic() - started < within_s, f"rank {rank}: the failure took more than {within_s}s to arrive"
