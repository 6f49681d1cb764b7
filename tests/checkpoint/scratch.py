# pyre-strict
"""A test case with a fresh temporary directory, ``self.root``, per test."""

import tempfile
import unittest
from pathlib import Path


class ScratchDirTest(unittest.TestCase):
    def setUp(self) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        self.root = Path(self._tmp.name)

    def tearDown(self) -> None:
        self._tmp.cleanup()
