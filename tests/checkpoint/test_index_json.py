# pyre-strict
"""``index_json`` decodes the text ``seal`` wrote in one msgspec pass: it must return exactly the
document the ``json`` module returns for every index-shaped file a save writes (index, manifest,
parts), and fall back to the checking parser for anything else instead of dropping a field."""

import json
from unittest import mock

import msgspec
import torch

from distributed_shampoo.checkpoint import parse, save_checkpoint
from distributed_shampoo.checkpoint.errors import CorruptCheckpointError
from distributed_shampoo.checkpoint.format import seal
from distributed_shampoo.checkpoint.parse import index_json
from tests.checkpoint.scratch import ScratchDirTest
from tests.checkpoint.tamper import writing_loader_files


class IndexJsonTest(ScratchDirTest):
    def test_every_index_shaped_file_decodes_as_json_does(self) -> None:
        state = {
            "state": {"w": {"m": torch.ones(3, 2), "v": torch.zeros(5, dtype=torch.bfloat16), "step": 4}},
            "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "name": "é"}],
        }
        with writing_loader_files():
            directory = save_checkpoint(self.root / "ckpt", state, metadata={"step": 4})
        files = sorted(path for path in directory.iterdir() if path.suffix == ".json")
        self.assertEqual([path.name for path in files][:2], ["optimizer.manifest.json", "optimizer.part-00001-of-00001.json"])
        self.assertEqual(files[-1].name, "optimizer.safetensors.index.json")
        for path in files:
            text = path.read_bytes()
            with mock.patch.object(parse, "strict_json", side_effect=AssertionError("not decoded in one pass")):
                decoded = index_json(text, path, "index")
            self.assertEqual(_plain(decoded), json.loads(text), path.name)

    def test_a_field_it_does_not_know_is_kept_not_dropped(self) -> None:
        document: dict[str, dict[str, object]] = {"metadata": {"tensors": {}, "checksums": {}, "pages": {}, "format": "x", "later_field": [1, {"a": 2}]}, "weight_map": {}}
        text = seal(document).encode()
        with mock.patch.object(parse, "strict_json", wraps=parse.strict_json) as checking_parser:
            self.assertEqual(_plain(index_json(text, self.root / "i.json", "index")), json.loads(text))
        checking_parser.assert_called_once()

    def test_a_map_of_another_kind_is_left_to_the_checking_parser(self) -> None:
        document: dict[str, dict[str, object]] = {"metadata": {"tensors": {}, "checksums": {'["a"]': 7}, "pages": {}}, "weight_map": {}}
        text = seal(document).encode()
        with mock.patch.object(parse, "strict_json", wraps=parse.strict_json) as checking_parser:
            self.assertEqual(index_json(text, self.root / "i.json", "index"), json.loads(text))
        checking_parser.assert_called_once()
        with self.assertRaisesRegex(CorruptCheckpointError, r"i\.json: the index is not valid JSON"):
            index_json(text[:-3], self.root / "i.json", "index")


def _plain(document: object) -> object:
    """``document`` with its lazily decoded entries (``msgspec.Raw``) decoded by ``json``."""
    if isinstance(document, msgspec.Raw):
        return json.loads(bytes(document))
    if isinstance(document, dict):
        return {key: _plain(value) for key, value in document.items()}
    return document
