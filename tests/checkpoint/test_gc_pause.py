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

    def test_the_collector_resumes_after_the_load_freed_its_objects(self) -> None:
        """The load's per-tensor objects are freed while the collector is paused. Left alive until
        it resumed, the collection that followed scanned them all (~2.5 ms for a 2,135-tensor
        load); freed first, a collection finds only what the load returns."""
        state = {f"t{i}": torch.full((2,), float(i)) for i in range(2000)}
        scanned: list[int] = []

        def record(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                scanned.append(len(gc.get_objects(generation=0)))

        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp, "ckpt"), state)
            template = {key: torch.zeros(2) for key in state}
            gc.collect()
            gc.callbacks.append(record)
            try:
                load_checkpoint(Path(tmp, "ckpt"), template)
            finally:
                gc.callbacks.remove(record)
        self.assertTrue(all(count < 1000 for count in scanned), scanned)
        self.assertTrue(all(torch.equal(template[key], value) for key, value in state.items()))
    def test_a_save_and_a_load_leave_no_reference_cycles_behind(self) -> None:
        """Nothing a save or a load makes waits for the collector to be freed: nested walkers that
        called themselves kept a (name, leaf) pair per saved tensor alive until it ran."""
        state = {f"t{i}": torch.full((2,), float(i)) for i in range(2000)}
        collected: list[int] = []

        def record(phase: str, info: dict[str, int]) -> None:
            if phase == "stop":
                collected.append(info["collected"])

        with tempfile.TemporaryDirectory() as tmp:
            gc.collect()
            gc.callbacks.append(record)
            try:
                save_checkpoint(Path(tmp, "ckpt"), state)
                load_checkpoint(Path(tmp, "ckpt"), {key: torch.zeros(2) for key in state})
                gc.collect()
            finally:
                gc.callbacks.remove(record)
        self.assertLess(sum(collected), 100, collected)


if __name__ == "__main__":
    unittest.main()
