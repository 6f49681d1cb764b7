# pyre-strict
"""Flip bits in every byte of the index and of each shard header of a 2-rank checkpoint, and in
a sample of data bytes: every load and every verify returns exactly the saved state or raises a
CheckpointError. Nothing else is allowed: no other exception, no different data."""

import struct
import tempfile
import unittest
from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor, Replicate, Shard

from distributed_shampoo.checkpoint import check_checkpoint, CheckpointError, load_checkpoint, save_checkpoint, verify_checkpoint
from distributed_shampoo.launch import run_on_ranks
from tests.checkpoint.tamper import add_loader_files, drop_loader_files, INDEX

# Every this many bytes of the manifest and the index parts are flipped (the lookup table: all).
_LOADER_STRIDE = 7
from tests.checkpoint.test_trust import _equal

# Each byte is tried with these masks: a low bit turns digits into neighbouring digits and
# letters into neighbouring letters (plausible edits); a high bit makes the byte non-ASCII.
_MASKS: tuple[int, ...] = (0x01, 0x80)
_DATA_STRIDE = 5


def _save(rank: int, world_size: int, directory: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    state = {
        "model": {
            "w": distribute_tensor(torch.arange(24.0).reshape(6, 4), mesh, [Shard(0)]),
            "r": distribute_tensor(torch.arange(4.0).reshape(2, 2), mesh, [Replicate()]),
        },
        "optim": {
            "state": {f"block_{rank}": {"m": torch.full((3,), rank + 0.5, dtype=torch.float64)}},
            "groups": [{"lr": 0.125, "betas": (0.9, 0.999), "name": "g", "on": True, "none": None, "inf": float("inf")}],
        },
        "step": torch.tensor(7),
        "empty": {},
    }
    save_checkpoint(directory, state, metadata={"step": 7, "tags": ["a"]})


def _zeros_like(state: object) -> object:
    """A template of the same structure: zero tensors, and values of the same types."""
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {key: _zeros_like(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_zeros_like(value) for value in state)
    return type(state)() if state is not None else None


def _header_length(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


class FuzzTest(unittest.TestCase):
    directory: Path
    expected: object

    @classmethod
    def setUpClass(cls) -> None:
        cls._tmp = tempfile.TemporaryDirectory()
        cls.directory = Path(cls._tmp.name, "ckpt")
        run_on_ranks(2, _save, str(cls.directory))
        cls.expected = load_checkpoint(cls.directory)

    @classmethod
    def tearDownClass(cls) -> None:
        cls._tmp.cleanup()

    def _flip_each(self, path: Path, offsets: range) -> int:
        """Flips each byte at ``offsets`` with each mask, checks load and verify, restores it."""
        original = path.read_bytes()
        tried = 0
        for offset in offsets:
            for mask in _MASKS:
                damaged = bytearray(original)
                damaged[offset] ^= mask
                path.write_bytes(bytes(damaged))
                self._check_outcome(f"{path.name} byte {offset} ^ {mask:#x}")
                tried += 1
        path.write_bytes(original)
        return tried

    def _check_outcome(self, what: str) -> None:
        try:
            loaded = load_checkpoint(self.directory)
        except CheckpointError:
            pass
        except Exception as error:  # the test's failure message names the flip
            self.fail(f"{what}: load raised {type(error).__name__}: {error}")
        else:
            self.assertTrue(_equal(loaded, self.expected), f"{what}: load returned different data")
        template = _zeros_like(self.expected)
        try:
            load_checkpoint(self.directory, template)  # pyre-ignore[6]: a dict built by _zeros_like
        except CheckpointError:
            self.assertTrue(_equal(template, _zeros_like(self.expected)), f"{what}: a failed load changed the template")
        except Exception as error:
            self.fail(f"{what}: load into a template raised {type(error).__name__}: {error}")
        else:
            self.assertTrue(_equal(template, self.expected), f"{what}: load into a template returned different data")
        try:
            verify_checkpoint(self.directory)
        except CheckpointError:
            pass
        except Exception as error:
            self.fail(f"{what}: verify raised {type(error).__name__}: {error}")
        report = check_checkpoint(self.directory)  # must never raise
        self.assertEqual(report.ok, not report.problems)

    def test_every_index_byte(self) -> None:
        index = self.directory / INDEX
        self.assertGreater(self._flip_each(index, range(len(index.read_bytes()))), 4000)

    def test_a_sample_of_the_loader_files_bytes(self) -> None:
        # A load into a template reads these instead of the index (a large index has them).
        add_loader_files(self.directory)
        try:
            tried = sum(
                self._flip_each(path, range(0, len(path.read_bytes()), _LOADER_STRIDE))
                for path in sorted([*self.directory.glob("*.manifest.json"), *self.directory.glob("*.part-*.json")])
            )
            lookup = next(self.directory.glob("*.lookup.bin"))
            tried += self._flip_each(lookup, range(len(lookup.read_bytes())))
        finally:
            drop_loader_files(self.directory)
        self.assertGreater(tried, 900)

    def test_every_shard_header_byte_and_a_sample_of_data_bytes(self) -> None:
        for path in sorted(self.directory.glob("*.safetensors")):
            header_end = _header_length(path)
            self._flip_each(path, range(header_end))
            self._flip_each(path, range(header_end, len(path.read_bytes()), _DATA_STRIDE))
