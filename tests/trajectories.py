# pyre-strict
"""What the trajectory tests share: a scratch directory per test class, the result rank 0 writes,
and the exact comparison of a run with the class's reference run."""

import tempfile
import unittest
from pathlib import Path

import torch

from distributed_shampoo import DistributedShampoo
from distributed_shampoo.checkpoint import load_checkpoint, save_checkpoint

# Per-step losses and the final full parameters of a run.
Result = tuple[list[float], dict[str, torch.Tensor]]


def read_result(path: str) -> Result:
    """What a run wrote with ``torch.save({"losses": ..., "params": ...}, path)``."""
    result = torch.load(path)
    return result["losses"], result["params"]


def save_training_state(directory: str, model: torch.nn.Module, optimizer: DistributedShampoo) -> None:
    """Checkpoints the model and the optimizer (every rank calls it)."""
    save_checkpoint(directory, {"model": model.state_dict(), "optimizer": optimizer.distributed_state_dict(model.named_parameters())})


def load_training_state(directory: str, model: torch.nn.Module, optimizer: DistributedShampoo) -> None:
    """Restores what ``save_training_state`` saved, at this run's world size and distribution."""
    template = {"model": model.state_dict(), "optimizer": optimizer.distributed_state_dict(model.named_parameters())}
    load_checkpoint(directory, template)
    model.load_state_dict(template["model"])
    optimizer.load_distributed_state_dict(template["optimizer"], model.named_parameters())


class TrajectoryTestCase(unittest.TestCase):
    """A test class whose runs write into ``path(name)`` and compare with ``reference``, which
    the subclass's ``setUpClass`` sets after calling this one."""

    tmp: tempfile.TemporaryDirectory[str]
    reference: Result = ([], {})

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.TemporaryDirectory()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.tmp.cleanup()

    @classmethod
    def path(cls, name: str) -> str:
        return str(Path(cls.tmp.name, name))

    def assertSameTrajectory(self, result: Result, from_step: int = 0) -> None:
        """The losses from ``from_step`` on and the final parameters equal the reference's, bit for bit."""
        losses, params = result
        self.assertEqual(losses, self.reference[0][from_step:])
        for name, value in self.reference[1].items():
            self.assertTrue(torch.equal(params[name], value), f"{name} differs by {float((params[name] - value).abs().max())}")
