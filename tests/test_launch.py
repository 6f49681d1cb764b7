# pyre-strict
"""The launcher leaves no rank running when the process that launched it is killed."""

import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

ROOT: Path = Path(__file__).resolve().parent.parent


def spin_forever(rank: int, world_size: int, pid_dir: str) -> None:
    """Records this rank's pid, then never returns."""
    Path(pid_dir, str(rank)).write_text(str(os.getpid()))
    while True:
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; it is dead for our purpose.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"


class LauncherTest(unittest.TestCase):
    def test_ranks_die_with_a_killed_launcher(self) -> None:
        with tempfile.TemporaryDirectory() as pid_dir:
            script = (
                "from distributed_shampoo.launch import run_on_ranks\n"
                "from tests.test_launch import spin_forever\n"
                f"run_on_ranks(2, spin_forever, {pid_dir!r}, timeout_s=600)\n"
            )
            launcher = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
            try:
                deadline = time.monotonic() + 120
                while len(os.listdir(pid_dir)) < 2 and time.monotonic() < deadline:
                    time.sleep(0.1)
                pids = [int(Path(pid_dir, name).read_text()) for name in sorted(os.listdir(pid_dir))]
                self.assertEqual(len(pids), 2)
            finally:
                launcher.send_signal(signal.SIGKILL)
                launcher.wait(30)
            deadline = time.monotonic() + 20
            while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
                time.sleep(0.1)
            self.assertEqual([pid for pid in pids if _alive(pid)], [])
