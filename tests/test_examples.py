# pyre-strict
"""The README's main job runs and reports an exact elastic resume."""

import subprocess
import sys
import unittest
from pathlib import Path

ROOT: Path = Path(__file__).resolve().parent.parent


class ElasticResumeExampleTest(unittest.TestCase):
    def test_resumed_runs_under_ddp_and_fsdp2_are_bit_identical_and_model_only_is_not(self) -> None:
        completed = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "elastic_resume.py"), "--steps", "10", "--stop-at", "5"],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )
        self.assertEqual(completed.returncode, 0, completed.stdout + completed.stderr)
        rows = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in completed.stdout.splitlines() if line.count("|") == 5}
        expected = {
            "DDP, resumed on 2 ranks": "yes",
            "DDP, resumed on 3 ranks": "yes",
            "DDP, 2 ranks, model only": "no",
            "FSDP2, resumed on 3 ranks": "yes",
        }
        self.assertEqual({label: rows.get(label) for label in expected}, expected)
