# pyre-strict
"""Damaged and hostile checkpoints raise their own CheckpointError, on load and on verify."""

import os
import signal
import tempfile
import unittest
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from parameterized import parameterized

from distributed_shampoo.checkpoint import (
    check_checkpoint,
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
from distributed_shampoo.checkpoint.format import MAX_INDEX_BYTES
from tests.checkpoint.faults import flip_last_byte, sigkill_while_staging
from tests.checkpoint.tamper import Document, drop_loader_files, edit_index, INDEX, replace_in_file, reseal, rewrite_header, writing_loader_files

_SHARD = "optimizer-00001-of-00001.safetensors"


def _state() -> dict[str | int, object]:
    return {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(10, 10, dtype=torch.float64), "lr": 0.1}


def _tensor(document: Document, name: str) -> dict[str, object]:
    tensors = document["metadata"]["tensors"]
    assert isinstance(tensors, dict)
    return tensors[name]


def _truncate(directory: Path) -> None:
    path = directory / _SHARD
    os.truncate(path, path.stat().st_size - 7)


def _append_byte(directory: Path) -> None:
    with open(directory / _SHARD, "ab") as file:
        file.write(b"\0")


def _garbage_header(directory: Path) -> None:
    path = directory / _SHARD
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    path.write_bytes(bytes(data))


def _rename_in_header(sealed: bool) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        replace_in_file(directory / _SHARD, b'[\\"a\\"]', b'[\\"z\\"]')  # escaped in the JSON header
        if sealed:
            reseal(directory)

    return apply


def _set_shape(document: Document) -> None:
    _tensor(document, '["a"]')["shape"] = [999]
    document["metadata"]["total_size"] = 999 * 4 + 100 * 8


def _huge_shape(document: Document) -> None:
    _tensor(document, '["a"]')["shape"] = [1 << 40]
    document["metadata"]["total_size"] = (1 << 42) + 100 * 8


def _nested(depth: int) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        text = (directory / INDEX).read_text()
        (directory / INDEX).write_text(text.replace('"user":{}', '"user":' + "[" * depth + "]" * depth))

    return apply


def _text_edit(old: str, new: str) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        text = (directory / INDEX).read_text()
        assert old in text, old
        (directory / INDEX).write_text(text.replace(old, new, 1))

    return apply


def _edit_header_entry(**fields: object) -> Callable[[Path], None]:
    """Sets fields of tensor "a"'s header entry, then reseals: the header matches the index's
    digest, so a load decodes it as it decodes what the writer wrote."""

    def edit(header: dict[str, object]) -> None:
        entry = header['["a"]']
        assert isinstance(entry, dict)
        entry.update(fields)

    return lambda directory: (rewrite_header(directory / _SHARD, edit), reseal(directory))[0]


def _set_checksum(document: dict[str, dict[str, object]], change: Callable[[str], object]) -> None:
    checksums = document["metadata"]["checksums"]
    assert isinstance(checksums, dict)
    checksums['["a"]'] = change(checksums['["a"]'])


def _header_metadata_rank(header: dict[str, object]) -> None:
    metadata = header["__metadata__"]
    assert isinstance(metadata, dict)
    metadata["rank"] = "3"


_DAMAGES: list[tuple[str, Callable[[Path], None], type[CheckpointError], str]] = [
    ("truncated", _truncate, CorruptCheckpointError, rf"{_SHARD}: truncated: \d+ bytes on disk, the index records \d+"),
    ("trailing_bytes", _append_byte, CorruptCheckpointError, r"has trailing bytes: \d+ bytes on disk, the index records"),
    ("flipped_byte", lambda d: flip_last_byte(d / _SHARD), ChecksumMismatchError, r'safetensors: \["a"\] has checksum [0-9a-f]{16}, the index records [0-9a-f]{16} \(corrupted data\)'),
    ("missing_shard", lambda d: (d / _SHARD).unlink(), MissingShardFileError, rf"shard file .*{_SHARD} does not exist"),
    ("garbage_header", _garbage_header, CorruptCheckpointError, r"the safetensors header is not valid JSON"),
    ("renamed_in_header", _rename_in_header(False), CorruptCheckpointError, r"the header does not match the index's digest [0-9a-f]{16}: it was modified or damaged"),
    ("renamed_in_header_resealed", _rename_in_header(True), IndexMismatchError, r'\["a"\] is absent in the file but the index says F32 \[1000\]'),
    ("header_rank_resealed", lambda d: (rewrite_header(d / _SHARD, _header_metadata_rank), reseal(d))[0], CorruptCheckpointError, r"the header's __metadata__ .* is not rank 0's of this save"),
    ("header_offsets_resealed", _edit_header_entry(data_offsets=[0, 4000, 1]), CorruptCheckpointError, r'header entry \["a"\] "data_offsets": expected \[begin, end\], got \[0, 4000, 1\]'),
    ("header_negative_dim_resealed", _edit_header_entry(shape=[-1000]), CorruptCheckpointError, r'header entry \["a"\] "shape": expected an integer >= 0, got -1000'),
    ("header_dtype_resealed", _edit_header_entry(dtype="F33"), CorruptCheckpointError, r"header entry \[\"a\"\]: unknown dtype 'F33'"),
    ("header_size_resealed", _edit_header_entry(data_offsets=[0, 3996]), CorruptCheckpointError, r'header entry \["a"\]: spans 3996 bytes but shape \[1000\] of F32 needs 4000'),
    ("index_edited", edit_index(lambda d: d["metadata"].update(total_size=1), sealed=False), CorruptCheckpointError, r'"index_digest": the index content hashes to [0-9a-f]{32} but records [0-9a-f]{32}: the index was modified or damaged'),
    ("index_object_edited", _text_edit('\\"lr\\"]":0.1', '\\"lr\\"]":0.2'), CorruptCheckpointError, r"the index was modified or damaged"),
    ("index_version", edit_index(lambda d: d["metadata"].update(format_version=4)), IncompatibleFormatError, r"format_version 4 is not supported \(this library reads 1, 2, 3\)"),
    ("index_format", edit_index(lambda d: d["metadata"].update(format="other")), IncompatibleFormatError, r"format 'other' is not 'distributed_shampoo.checkpoint'"),
    ("index_no_metadata", edit_index(lambda d: d.pop("metadata"), sealed=False), CorruptCheckpointError, r'"metadata": expected an object, got None'),
    ("index_weight_map", edit_index(lambda d: d["weight_map"].pop('["a"]')), CorruptCheckpointError, r'"weight_map": lists other stored tensors than "tensors": extra \[\], missing \[\'\["a"\]\'\]'),
    ("index_invalid_rank", edit_index(lambda d: d["weight_map"].update({'["a"]': "optimizer-00003-of-00001.safetensors"})), CorruptCheckpointError, r"weight_map\": names files outside this checkpoint: \['optimizer-00003-of-00001.safetensors'\]"),
    ("index_garbage", lambda d: (d / INDEX).write_bytes(b"\x00not json"), CorruptCheckpointError, r"the index is not valid JSON"),
    ("index_missing", lambda d: (d / INDEX).unlink(), CheckpointNotFoundError, r"no complete checkpoint in .*: no index file"),
    ("index_duplicate_key", _text_edit('"weight_map":{', '"weight_map":{"x":"y",'.replace('"x":"y",', '"[\\"a\\"]":"z",')), CorruptCheckpointError, r"duplicate key '\[\"a\"\]'"),
    ("index_checksum_two_digests", edit_index(lambda d: _set_checksum(d, lambda c: f"{c},{c}")), CorruptCheckpointError, r'"checksums" \["a"\]: expected 16 lowercase hex digits, got \'[0-9a-f]{16},[0-9a-f]{16}\''),
    ("index_checksum_upper_case", edit_index(lambda d: _set_checksum(d, str.upper)), CorruptCheckpointError, r'"checksums" \["a"\]: expected 16 lowercase hex digits'),
    ("index_checksum_not_a_string", edit_index(lambda d: _set_checksum(d, lambda c: 7)), CorruptCheckpointError, r'"checksums" \["a"\]: expected a string, got 7'),
    ("index_shape_not_a_list", edit_index(lambda d: _tensor(d, '["a"]').update(shape=5)), CorruptCheckpointError, r'"tensors" \["a"\] "shape": expected a list of sizes, got 5'),
    ("index_chunks_not_a_list", edit_index(lambda d: _tensor(d, '["a"]').update(chunks={})), CorruptCheckpointError, r'"tensors" \["a"\] "chunks": expected a list, got \{\}'),
    ("index_negative_dim", edit_index(lambda d: _tensor(d, '["a"]').update(shape=[-1000])), CorruptCheckpointError, r'"shape": expected an integer >= 0, got -1000'),
    ("index_float_out_of_range", _text_edit('"total_size":', '"total_size":1e400,"x":'), CorruptCheckpointError, r"number 1e400 is out of range"),
    ("index_nan_literal", _text_edit('"total_size":', '"total_size":NaN,"x":'), CorruptCheckpointError, r"NaN is not a JSON number"),
    ("index_deep_nesting", _nested(100_000), CorruptCheckpointError, r"the index is nested too deeply"),
    ("index_name_not_json", edit_index(lambda d: d["metadata"]["tensors"].update({"not json": {"dtype": "F32", "shape": []}})), CorruptCheckpointError, r"'not json' is not a JSON-list key"),
    ("index_world_size_huge", edit_index(lambda d: d["metadata"].update(world_size=10**7)), CorruptCheckpointError, r'"files": must list exactly the 10000000 shard files of 10000000 ranks'),
    ("index_shape_huge", edit_index(_huge_shape), CorruptCheckpointError, r'"size": is \d+ bytes but the tensors mapped to it hold 4398046511904'),
    ("index_too_large", lambda d: os.truncate(d / INDEX, MAX_INDEX_BYTES + 1), CorruptCheckpointError, rf"the index holds {MAX_INDEX_BYTES + 1} bytes, more than the {MAX_INDEX_BYTES} allowed"),
    ("index_dev_zero", lambda d: ((d / INDEX).unlink(), (d / INDEX).symlink_to("/dev/zero"))[0], CorruptCheckpointError, r"the index is not a regular file \(it is a character device\)"),
    ("index_fifo", lambda d: ((d / INDEX).unlink(), os.mkfifo(d / INDEX))[0], CorruptCheckpointError, r"the index is not a regular file \(it is a FIFO\)"),
    ("shard_fifo", lambda d: ((d / _SHARD).unlink(), os.mkfifo(d / _SHARD))[0], CorruptCheckpointError, rf"{_SHARD}: the shard file is not a regular file \(it is a FIFO\)"),
    ("shard_directory", lambda d: ((d / _SHARD).unlink(), (d / _SHARD).mkdir())[0], CorruptCheckpointError, rf"{_SHARD}: the shard file is not a regular file \(it is a directory\)"),
    ("shard_dev_zero", lambda d: ((d / _SHARD).unlink(), (d / _SHARD).symlink_to("/dev/zero"))[0], CorruptCheckpointError, r"the shard file is not a regular file \(it is a character device\)"),
]


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fails the test instead of hanging (a FIFO opened without O_NONBLOCK blocks for ever)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds}s: the call blocked")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# A load into a template validates only its own tensors' entries (a large index's loader files
# hold no others): it names a damage in them in its own words, and does not see one elsewhere
# (None: it loads the saved data). Whole loads and verify still raise ``message``.
_TEMPLATE_LOAD_MESSAGES: dict[str, str | None] = {
    "index_weight_map": r'"weight_map": lacks stored tensors that "tensors" holds: \[\'\["a"\]\'\]',
    "index_name_not_json": None,
}


_MANIFEST, _LOOKUP, _PART = "optimizer.manifest.json", "optimizer.lookup.bin", "optimizer.part-00001-of-00001.json"


def _edit_loader_file(name: str, old: bytes, new: bytes) -> Callable[[Path], None]:
    return lambda directory: replace_in_file(directory / name, old, new)


# Damage to the loader's files: a load with a template reads them (not the index), and raises.
_LOADER_DAMAGES: list[tuple[str, Callable[[Path], None], type[CheckpointError], str]] = [
    ("manifest_edited", _edit_loader_file(_MANIFEST, b'\\"lr\\"]":0.1', b'\\"lr\\"]":0.2'), CorruptCheckpointError, r"manifest.json: \"index_digest\": .* the index was modified or damaged"),
    ("manifest_garbage", lambda d: (d / _MANIFEST).write_bytes(b"\x00"), CorruptCheckpointError, r"manifest.json: the manifest is not valid JSON"),
    ("manifest_fifo", lambda d: ((d / _MANIFEST).unlink(), os.mkfifo(d / _MANIFEST))[0], CorruptCheckpointError, r"the manifest is not a regular file \(it is a FIFO\)"),
    ("lookup_flipped", lambda d: (d / _LOOKUP).write_bytes(bytes([(d / _LOOKUP).read_bytes()[0] ^ 1]) + (d / _LOOKUP).read_bytes()[1:]), CorruptCheckpointError, r"lookup.bin: the lookup table does not match the manifest's size and digest"),
    ("lookup_truncated", lambda d: os.truncate(d / _LOOKUP, 12), CorruptCheckpointError, r"lookup.bin: the lookup table does not match the manifest's size and digest"),
    ("lookup_missing", lambda d: (d / _LOOKUP).unlink(), CorruptCheckpointError, r"lookup table .*optimizer.lookup.bin does not exist"),
    ("part_edited", _edit_loader_file(_PART, b'"shape":[1000]', b'"shape":[999]'), CorruptCheckpointError, r"part-00001-of-00001.json: \"index_digest\": .* the index was modified or damaged"),
    ("part_missing", lambda d: (d / _PART).unlink(), CorruptCheckpointError, r"index part .*part-00001-of-00001.json does not exist"),
]


class BadInputTest(unittest.TestCase):
    def setUp(self) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        self.directory = Path(self._tmp.name) / "ckpt"
        with writing_loader_files():
            save_checkpoint(self.directory, _state())

    def tearDown(self) -> None:
        self._tmp.cleanup()

    @parameterized.expand(_DAMAGES)
    def test_load_and_verify_raise(
        self, _name: str, damage: Callable[[Path], None], error: type[CheckpointError], message: str
    ) -> None:
        damage(self.directory)
        drop_loader_files(self.directory)  # every load reads the damaged index (the loader's files: below)
        template = {"a": torch.zeros(1000), "b": torch.zeros(10, 10, dtype=torch.float64), "lr": 0.0}
        with _deadline(20):
            with self.assertRaisesRegex(error, message):
                load_checkpoint(self.directory)
            template_message = _TEMPLATE_LOAD_MESSAGES.get(_name, message)
            if template_message is None:
                load_checkpoint(self.directory, template)
                self.assertTrue(torch.equal(template["a"], _state()["a"]))  # pyre-ignore[6]
                self.assertEqual(template["lr"], 0.1)
            else:
                with self.assertRaisesRegex(error, template_message):
                    load_checkpoint(self.directory, template)
                # A load that raised left the template as it was.
                self.assertTrue(torch.equal(template["a"], torch.zeros(1000)))  # pyre-ignore[6]
                self.assertEqual(template["lr"], 0.0)
            with self.assertRaisesRegex(error, message):
                verify_checkpoint(self.directory)
            report = check_checkpoint(self.directory)  # never raises
        self.assertFalse(report.ok)
        self.assertRegex(str(report.problems[0]), message)

    @parameterized.expand(_LOADER_DAMAGES)
    def test_damaged_loader_files_fail_template_loads_and_verify(
        self, _name: str, damage: Callable[[Path], None], error: type[CheckpointError], message: str
    ) -> None:
        damage(self.directory)
        template = {"a": torch.zeros(1000), "b": torch.zeros(10, 10, dtype=torch.float64), "lr": 0.0}
        with _deadline(20):
            with self.assertRaisesRegex(error, message):
                load_checkpoint(self.directory, template)
            self.assertFalse(check_checkpoint(self.directory).ok)
            # Without a template, the whole index is read and the loader's files are not.
            self.assertEqual(load_checkpoint(self.directory)["lr"], 0.1)
        self.assertTrue(torch.equal(template["a"], torch.zeros(1000)))  # pyre-ignore[6]

    def test_unknown_fields_of_entries_are_ignored(self) -> None:
        # What a later writer may add to an index or header entry: a load skips it.
        edit_index(lambda d: _tensor(d, '["a"]').update(note="added"))(self.directory)
        _edit_header_entry(note="added")(self.directory)
        for loaded in (load_checkpoint(self.directory), load_checkpoint(self.directory, {"a": torch.zeros(1000)}, strict=False)):
            self.assertTrue(torch.equal(loaded["a"], _state()["a"]))  # pyre-ignore[6]: a tensor

    def test_index_and_header_that_disagree(self) -> None:
        edit_index(_set_shape)(self.directory)
        message = r'\["a"\] is F32 \[1000\] in the file but the index says F32 \[999\]'
        with self.assertRaisesRegex(IndexMismatchError, message):
            load_checkpoint(self.directory)
        with self.assertRaisesRegex(IndexMismatchError, message):
            load_checkpoint(self.directory, {"a": torch.zeros(999)}, strict=False)
        with self.assertRaisesRegex(IndexMismatchError, message):
            verify_checkpoint(self.directory)

    def test_flipped_byte_in_partially_read_key_still_caught_by_verify(self) -> None:
        flip_last_byte(self.directory / _SHARD)
        loaded = load_checkpoint(self.directory, keys=["lr"])  # reads no tensor: nothing to notice
        self.assertEqual(loaded, {"lr": 0.1})
        with self.assertRaises(ChecksumMismatchError):
            verify_checkpoint(self.directory)

    def test_load_without_verification_skips_checksums(self) -> None:
        flip_last_byte(self.directory / _SHARD)
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
