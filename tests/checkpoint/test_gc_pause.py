# pyre-strict
"""Saves and loads pause the cyclic garbage collector and always restore its state."""

import gc
import tempfile
import unittest
from pathlib import Path

import torch

from distributed_shampoo.checkpoint import CheckpointNotFoundError, load_checkpoint, save_checkpoint


class PausedCollectorTest(unittest.TestCase):
    def test_the_collector_is_back_after_a_save_a_load_and_a_failed_load(self) -> None:
        self.assertTrue(gc.isenabled())
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp, "ckpt"), {"w": torch.ones(3)})
            self.assertTrue(gc.isenabled())
            template = {"w": torch.zeros(3)}
            load_checkpoint(Path(tmp, "ckpt"), template)
            self.assertTrue(torch.equal(template["w"], torch.ones(3)))
            self.assertTrue(gc.isenabled())
            with self.assertRaises(CheckpointNotFoundError):
                load_checkpoint(Path(tmp, "missing"), template)
            self.assertTrue(gc.isenabled())

    def test_a_collector_the_caller_disabled_stays_disabled(self) -> None:
        gc.disable()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(Path(tmp, "ckpt"), {"w": torch.ones(3)})
                load_checkpoint(Path(tmp, "ckpt"), {"w": torch.zeros(3)})
            self.assertFalse(gc.isenabled())
        finally:
            gc.enable()


if __name__ == "__main__":
    unittest.main()
