# pyre-strict
"""The index digest covers ``canonical_json``'s text: it must be exactly ``json.dumps``' canonical
text for every document, whichever encoder wrote which part (a reader written without this code
re-encodes with json to check a reformatted index)."""

import json
import random
import unittest

from parameterized import parameterized

from distributed_shampoo.checkpoint.format import canonical_json


def _reference(document: object) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


class _Text(str):
    """A str subclass: the fast path must not assume it encodes as a str does."""


_ALL_ASCII: str = "".join(chr(code) for code in range(128))

_CASES: list[tuple[str, object]] = [
    ("plain_index_like", {"metadata": {"tensors": {'["a"]': {"dtype": "F32", "shape": [2, 3]}}, "n": 3}, "weight_map": {'["a"]': "f"}}),
    ("float_beside_large_maps", {"metadata": {"objects": {"lr": 0.001, "big": 1e16, "small": 1e-05}, "checksums": {"a": "0f"}}}),
    ("float_in_a_list", {"a": [1, 2.5, [3, -0.0]], "b": True, "c": None}),
    ("every_ascii_character", {_ALL_ASCII: _ALL_ASCII, "del": "\x7f"}),
    ("non_ascii_keys_and_values", {"名前": "値", "é": ["ü", {"ß": 1}], "emoji": "\U0001f600"}),
    ("int_keys", {"user": {1: "a", 10: "b", 9: "c"}}),
    ("str_subclass", {"k": _Text("v"), _Text("key"): 1}),
    ("tuples", {"t": (1, (2, "x")), "u": ()}),
    ("big_ints_and_bools", {"i": 2**70, "n": -(2**63), "t": True, "f": False}),
    ("empty_containers", {"a": {}, "b": [], "c": [{}], "d": ""}),
    ("top_level_list", [{"b": 1, "a": 2}, "x", 3.5]),
    ("scalar", 7),
]


def _random_document(rng: random.Random, depth: int) -> object:
    kind = rng.randrange(9 if depth < 4 else 5)
    if kind == 0:
        return rng.choice(["", "x", "a\"b", "\\", "\x00\x1f", "\x7f", "é", "\u2028", "[\"k\"]"])
    if kind == 1:
        return rng.choice([0, -1, 2**40, 2**64 + 1])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return rng.choice([0.5, 1e16, 1e-7, -2.25, 123456789.125])
    if kind == 4:
        return rng.choice(["plain", "text"])
    if kind in (5, 6):
        return [_random_document(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["a", "b", "é", "\x7f", "z", "[0]", "k"]) + str(i): _random_document(rng, depth + 1) for i in range(rng.randrange(5))}


class CanonicalJsonTest(unittest.TestCase):
    @parameterized.expand(_CASES)
    def test_same_text_as_json(self, _name: str, document: object) -> None:
        self.assertEqual(canonical_json(document), _reference(document))

    def test_same_text_as_json_for_random_documents(self) -> None:
        rng = random.Random(12)
        for _ in range(300):
            document = _random_document(rng, 0)
            self.assertEqual(canonical_json(document), _reference(document), repr(document))

    def test_nan_is_refused_as_json_refuses_it(self) -> None:
        for value in (float("nan"), float("inf")):
            with self.assertRaisesRegex(ValueError, "Out of range float values are not JSON compliant"):
                canonical_json({"metadata": {"tensors": {"a": "b"}, "objects": {"x": value}}})
