# pyre-strict
"""Damaged checkpoints raise their own CheckpointError; a killed save loses nothing."""

import json
import os
import signal
import tempfile
import unittest
from collections.abc import Callable
from pathlib import Path

import torch
from parameterized import parameterized

from distributed_shampoo.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    IncompatibleFormatError,
    IndexMismatchError,
    load_checkpoint,
    MissingShardFileError,
    save_checkpoint,
    verify_checkpoint,
)
from tests.checkpoint.faults import flip_last_byte, sigkill_while_staging

_SHARD = "optimizer-00001-of-00001.safetensors"
_INDEX = "optimizer.safetensors.index.json"


def _state() -> dict[str | int, object]:
    return {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(10, 10, dtype=torch.float64), "lr": 0.1}


def _truncate(directory: Path) -> None:
    path = directory / _SHARD
    os.truncate(path, path.stat().st_size - 7)


def _flip_last_byte(directory: Path) -> None:
    flip_last_byte(directory / _SHARD)


def _append_byte(directory: Path) -> None:
    with open(directory / _SHARD, "ab") as file:
        file.write(b"\0")


def _delete_shard(directory: Path) -> None:
    (directory / _SHARD).unlink()


def _edit_index(edit: Callable[[dict[str, dict[str, object]]], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        path = directory / _INDEX
        document = json.loads(path.read_text())
        edit(document)
        path.write_text(json.dumps(document))

    return apply


def _set_shape(document: dict[str, dict[str, object]]) -> None:
    document["metadata"]["tensors"]['["a"]']["shape"] = [999]  # pyre-ignore[16]


def _rename_in_header(directory: Path) -> None:
    path = directory / _SHARD
    # In the JSON header the stored name ["a"] appears escaped.
    data = path.read_bytes()
    assert b'[\\"a\\"]' in data
    path.write_bytes(data.replace(b'[\\"a\\"]', b'[\\"z\\"]', 1))


def _garbage_header(directory: Path) -> None:
    path = directory / _SHARD
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    path.write_bytes(bytes(data))


_DAMAGES: list[tuple[str, Callable[[Path], None], type[CheckpointError], str]] = [
    ("truncated", _truncate, CorruptCheckpointError, r"optimizer-00001-of-00001.safetensors: truncated: .* bytes on disk, header describes"),
    ("trailing_bytes", _append_byte, CorruptCheckpointError, r"has trailing bytes"),
    ("flipped_byte", _flip_last_byte, ChecksumMismatchError, r'safetensors: \["a"\] has checksum [0-9a-f]{16}, the index records [0-9a-f]{16}'),
    ("missing_shard", _delete_shard, MissingShardFileError, r"shard file .*optimizer-00001-of-00001.safetensors named by the index does not exist"),
    ("garbage_header", _garbage_header, CorruptCheckpointError, r"safetensors header is not valid JSON"),
    ("renamed_in_file", _rename_in_header, IndexMismatchError, r'\["a"\] is absent in the file but the index says F32 \[1000\]'),
    ("index_shape", _edit_index(_set_shape), IndexMismatchError, r'\["a"\] is F32 \[1000\] in the file but the index says F32 \[999\]'),
    ("index_version", _edit_index(lambda d: d["metadata"].update(format_version=2)), IncompatibleFormatError, r"format_version 2 is not supported \(this library reads 1..1\)"),
    ("index_format", _edit_index(lambda d: d["metadata"].update(format="other")), IncompatibleFormatError, r"format 'other' is not 'distributed_shampoo.checkpoint'"),
    ("index_no_metadata", _edit_index(lambda d: d.pop("metadata")), CorruptCheckpointError, r'missing "metadata" object'),
    ("index_weight_map", _edit_index(lambda d: d["weight_map"].pop('["a"]')), CorruptCheckpointError, r'"weight_map", "checksums" and "tensors" list different stored tensors'),
    ("index_invalid_rank", _edit_index(lambda d: d["weight_map"].update({'["a"]': "optimizer-00003-of-00001.safetensors"})), CorruptCheckpointError, r"weight_map names files outside this checkpoint: \['optimizer-00003-of-00001.safetensors'\]"),
    ("index_garbage", lambda d: (d / _INDEX).write_bytes(b"\x00not json"), CorruptCheckpointError, r"not a valid JSON index"),
    ("index_missing", lambda d: (d / _INDEX).unlink(), CheckpointNotFoundError, r"no complete checkpoint in .*: no index file"),
]


class BadInputTest(unittest.TestCase):
    def setUp(self) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        self.directory = Path(self._tmp.name) / "ckpt"
        save_checkpoint(self.directory, _state())

    def tearDown(self) -> None:
        self._tmp.cleanup()

    @parameterized.expand(_DAMAGES)
    def test_load_and_verify_raise(
        self, _name: str, damage: Callable[[Path], None], error: type[CheckpointError], message: str
    ) -> None:
        damage(self.directory)
        with self.assertRaisesRegex(error, message):
            load_checkpoint(self.directory)
        with self.assertRaisesRegex(error, message):
            verify_checkpoint(self.directory)

    def test_flipped_byte_in_partially_read_key_still_caught_by_verify(self) -> None:
        _flip_last_byte(self.directory)
        loaded = load_checkpoint(self.directory, keys=["lr"])  # reads no tensor: nothing to notice
        self.assertEqual(loaded, {"lr": 0.1})
        with self.assertRaises(ChecksumMismatchError):
            verify_checkpoint(self.directory)

    def test_load_without_verification_skips_checksums(self) -> None:
        _flip_last_byte(self.directory)
        loaded = load_checkpoint(self.directory, verify=False)
        # Tensors are laid out largest element first, so the last byte belongs to "a".
        self.assertFalse(torch.equal(loaded["a"], torch.arange(1000, dtype=torch.float32)))  # pyre-ignore[6]

    def test_not_a_directory(self) -> None:
        with self.assertRaisesRegex(CheckpointNotFoundError, r"no checkpoint at .*nowhere: not a directory"):
            load_checkpoint(self.directory.parent / "nowhere")


def _save_forever(directory: str, started: str) -> None:
    """Saves large checkpoints over ``directory`` again and again (killed by the test)."""
    state = {f"t{i}": torch.full((256, 1024), float(i)) for i in range(64)}  # 64 MiB
    Path(started).touch()
    while True:
        save_checkpoint(directory, state, overwrite=True)


class KilledSaveTest(unittest.TestCase):
    def test_sigkill_midway_leaves_previous_checkpoint_loadable(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / "ckpt"
            original = {"w": torch.randn(100, 100), "step": 3}
            save_checkpoint(directory, original)
            started = Path(tmp) / "started"
            exit_code = sigkill_while_staging(_save_forever, (str(directory), str(started)), started, ".ckpt.incomplete-*")
            self.assertEqual(exit_code, -signal.SIGKILL)
            loaded = load_checkpoint(directory)
            verify_checkpoint(directory)
            if "t0" not in loaded:  # the kill landed before the first new save was published
                self.assertTrue(torch.equal(loaded["w"], original["w"]))  # pyre-ignore[6]
                self.assertEqual(loaded["step"], 3)
            else:
                self.assertEqual(len(loaded), 64)
