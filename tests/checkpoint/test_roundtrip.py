# pyre-strict
"""Single-process save/load: every dtype and leaf kind, templates, keys, format compatibility."""

import errno
import json
import math
import os
import stat
import tempfile
import unittest
from collections.abc import Callable
from unittest import mock
from pathlib import Path

import torch
from parameterized import parameterized
from safetensors import safe_open

from distributed_shampoo.checkpoint import (
    CheckpointExistsError,
    load_checkpoint,
    MissingKeyError,
    read_checkpoint_index,
    save_checkpoint,
    TemplateMismatchError,
    UnsupportedValueError,
    verify_checkpoint,
)
from distributed_shampoo.checkpoint import index_parts
from distributed_shampoo.checkpoint.format import checksum, checksums_of, DTYPE_TO_NAME, seal, sealed_digest
from distributed_shampoo.checkpoint.writer import shared_bytes, start_safetensors, tensor_bytes, write_safetensors
from distributed_shampoo.utils.shampoo_checkpoint_utils import flatten
from tests.checkpoint.scratch import ScratchDirTest

_DTYPES: list[tuple[str, torch.dtype]] = [(str(d).removeprefix("torch."), d) for d in DTYPE_TO_NAME]


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random bytes reinterpreted as ``dtype``: every bit pattern, NaNs included, must survive."""
    generator = torch.Generator().manual_seed(seed)
    count = math.prod(shape) * dtype.itemsize
    raw = torch.randint(0, 256, (count,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        return (raw % 2).to(torch.bool).reshape(shape)
    return raw.view(dtype).reshape(shape)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


class RoundTripTest(ScratchDirTest):
    @parameterized.expand(_DTYPES)
    def test_every_dtype_and_shape_bit_exact(self, _name: str, dtype: torch.dtype) -> None:
        base = _random((6, 10), dtype, seed=1)
        state: dict[str | int, object] = {
            "matrix": base,
            "scalar": _random((), dtype, seed=2),
            "empty": _random((0, 3), dtype),
            "strided": base[::2, 1::3],  # non-contiguous view
            "transposed": base.t(),
        }
        save_checkpoint(self.root / "ckpt", state)
        loaded = load_checkpoint(self.root / "ckpt")
        for key, expected in state.items():
            actual = loaded[key]
            assert isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor)
            self.assertTrue(_bits_equal(actual, expected), key)

    def test_nested_containers_and_scalars(self) -> None:
        state: dict[str | int, object] = {
            "state": {"w": {"block_0": {"factors": {0: torch.ones(2), 1: torch.zeros(3)}}, "step": 7}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 1.0), "params": ["w", "b"], "eps": float("-inf")}],
            "values": {"inf": math.inf, "nan": math.nan, "yes": True, "none": None, "text": "é\n", "big": 2**62},
            "empty_dict": {},
            "empty_list": [],
            "empty_tuple": (),
            "nested_tuple": ((1, 2), [3.5]),
            5: "int key",
        }
        save_checkpoint(self.root / "ckpt", state)
        loaded = load_checkpoint(self.root / "ckpt")
        values = loaded["values"]
        assert isinstance(values, dict)
        self.assertTrue(math.isnan(values.pop("nan")))
        expected = dict(state)
        expected["values"] = {k: v for k, v in state["values"].items() if k != "nan"}  # pyre-ignore[16]
        self.assertEqual(list(loaded["param_groups"][0]["betas"]), [0.9, 1.0])  # pyre-ignore[16]
        self.assertEqual(_structure(loaded), _structure(expected))
        self.assertIsInstance(loaded["param_groups"][0]["betas"], tuple)
        self.assertIsInstance(loaded["param_groups"], list)
        self.assertEqual(loaded[5], "int key")

    def test_template_filled_in_place_with_template_types(self) -> None:
        saved_weight = torch.randn(4, 3)
        save_checkpoint(
            self.root / "ckpt",
            {"w": saved_weight, "cfg": {"lr": 1, "betas": [0.5, 0.25], "name": "x", "step": 4.0}},
        )
        weight = torch.zeros(4, 3)
        template: dict[str | int, object] = {"w": weight, "cfg": {"lr": 0.0, "betas": (0.0, 0.0), "name": "", "step": 0}}
        result = load_checkpoint(self.root / "ckpt", template)
        self.assertIs(result, template)
        self.assertIs(template["w"], weight)
        self.assertTrue(torch.equal(weight, saved_weight))
        cfg = template["cfg"]
        assert isinstance(cfg, dict)
        self.assertEqual(cfg, {"lr": 1.0, "betas": (0.5, 0.25), "name": "x", "step": 4})
        self.assertIsInstance(cfg["lr"], float)
        self.assertIsInstance(cfg["step"], int)
        self.assertIsInstance(cfg["betas"], tuple)

    def test_template_on_non_contiguous_and_other_layout(self) -> None:
        saved = torch.randn(5, 4)
        save_checkpoint(self.root / "ckpt", {"w": saved})
        storage = torch.zeros(4, 5)
        view = storage.t()  # a non-contiguous destination
        load_checkpoint(self.root / "ckpt", {"w": view})
        self.assertTrue(torch.equal(storage.t(), saved))

    def test_keys_restrict_what_is_read(self) -> None:
        save_checkpoint(self.root / "ckpt", {"model": {"w": torch.ones(2)}, "optim": {"m": torch.zeros(2), "lr": 0.1}})
        self.assertEqual(list(load_checkpoint(self.root / "ckpt", keys=["model"])), ["model"])
        only = load_checkpoint(self.root / "ckpt", keys=[("optim", "lr")])
        self.assertEqual(only, {"optim": {"lr": 0.1}})
        template: dict[str | int, object] = {"model": {"w": torch.zeros(2)}, "optim": {"m": torch.ones(2), "lr": 0.0}}
        load_checkpoint(self.root / "ckpt", template, keys=["model"])
        self.assertTrue(torch.equal(template["model"]["w"], torch.ones(2)))  # pyre-ignore[16]
        self.assertTrue(torch.equal(template["optim"]["m"], torch.ones(2)))
        self.assertEqual(template["optim"]["lr"], 0.0)

    def test_strict_and_missing_keys(self) -> None:
        save_checkpoint(self.root / "ckpt", {"a": torch.ones(1)})
        template: dict[str | int, object] = {"a": torch.zeros(1), "b": torch.zeros(1), "c": 3}
        with self.assertRaisesRegex(MissingKeyError, r'holds no value for 2 template keys: \["b"\], \["c"\]'):
            load_checkpoint(self.root / "ckpt", template)
        load_checkpoint(self.root / "ckpt", template, strict=False)
        self.assertTrue(torch.equal(template["a"], torch.ones(1)))  # pyre-ignore[6]
        self.assertEqual(template["c"], 3)

    @parameterized.expand(
        [
            ("shape", torch.zeros(3, 2), r'\["w"\]: the template has a F32 tensor of shape \[3, 2\] but .* saved F32 \[2, 3\]'),
            ("dtype", torch.zeros(2, 3, dtype=torch.float64), r'\["w"\]: the template has a F64 tensor .* saved F32 \[2, 3\]'),
            ("kind", 1.0, r'\["w"\]: the template holds 1.0 but .* saved a tensor there'),
        ]
    )
    def test_template_mismatch(self, _name: str, leaf: object, message: str) -> None:
        save_checkpoint(self.root / "ckpt", {"w": torch.zeros(2, 3), "lr": "x"})
        with self.assertRaisesRegex(TemplateMismatchError, message):
            load_checkpoint(self.root / "ckpt", {"w": leaf})
        with self.assertRaisesRegex(TemplateMismatchError, r'\["lr"\]: saved str \'x\' cannot become the template\'s float'):
            load_checkpoint(self.root / "ckpt", {"lr": 0.5})

    @parameterized.expand(
        [
            ("object", {"x": object()}, r'\["x"\]: cannot save a builtins.object without pickling'),
            ("set", {"a": {"b": {1, 2}}}, r'\["a", "b"\]: cannot save a builtins.set'),
            ("complex_dtype", {"d": torch.complex64}, r'\["d"\]: cannot save a torch.dtype without pickling'),
            ("tuple_key", {"a": {(1, 2): 1}}, r'\["a"\]: key \(1, 2\) is a tuple; keys must be str or int'),
            ("complex128", {"c": torch.zeros(2, dtype=torch.complex128)}, r'\["c"\]: dtype torch.complex128 cannot be stored'),
            ("sparse", {"s": torch.eye(2).to_sparse()}, r'\["s"\]: only strided \(dense\) tensors'),
            ("flattened_key_twice", {"s": {'["a", 1]': 1, '[ "a",1 ]': 2}}, r'\["s"\]: the flattened key \["a", 1\] is spelled twice'),
            ("flattened_key_under_another", {"s": {'["a"]': 1, '["a", "b"]': 2}}, r'\["s"\]: the flattened key \["a"\] is spelled twice, or another key lies under it'),
        ]
    )
    def test_unsupported_values_name_their_key(self, _name: str, state: dict[str | int, object], message: str) -> None:
        with self.assertRaisesRegex(UnsupportedValueError, message):
            save_checkpoint(self.root / "ckpt", state)
        self.assertEqual(os.listdir(self.root), [])  # nothing left behind

    def test_metadata_must_be_json(self) -> None:
        with self.assertRaisesRegex(UnsupportedValueError, "metadata must be JSON-serialisable"):
            save_checkpoint(self.root / "ckpt", {}, metadata={"t": torch.zeros(1)})
        save_checkpoint(self.root / "ckpt", {}, metadata={"step": 100, "tags": ["a"]})
        self.assertEqual(read_checkpoint_index(self.root / "ckpt").user_metadata, {"step": 100, "tags": ["a"]})
        self.assertEqual(load_checkpoint(self.root / "ckpt"), {})

    def test_existing_checkpoint_refused_unless_overwrite(self) -> None:
        save_checkpoint(self.root / "ckpt", {"v": torch.zeros(2)})
        with self.assertRaisesRegex(CheckpointExistsError, "already exists; pass overwrite=True"):
            save_checkpoint(self.root / "ckpt", {"v": torch.ones(2)})
        self.assertTrue(torch.equal(load_checkpoint(self.root / "ckpt")["v"], torch.zeros(2)))  # pyre-ignore[6]
        save_checkpoint(self.root / "ckpt", {"v": torch.ones(2), "w": torch.ones(1)}, overwrite=True)
        self.assertTrue(torch.equal(load_checkpoint(self.root / "ckpt")["v"], torch.ones(2)))  # pyre-ignore[6]
        self.assertEqual(sorted(os.listdir(self.root)), ["ckpt"])  # no staging or replaced leftovers


def _nested_state() -> dict[str, object]:
    return {
        "state": {"fc.weight": {"step": torch.tensor(3), "block_0": {"shampoo": {"factor_matrices": {0: torch.eye(2), 1: torch.ones(3, 3)}}, "momentum": torch.arange(4.0)}}},
        "param_groups": {"fc.weight": {"lr": 0.5}},
    }


def _flattened_state() -> dict[str, object]:
    """``_nested_state`` with the parameter's state flattened, as the reference's ``distributed_state_dict``."""
    return {
        "state": {"fc.weight": {
            '["step"]': torch.tensor(3), '["block_0", "shampoo", "factor_matrices", 0]': torch.eye(2),
            '["block_0", "shampoo", "factor_matrices", 1]': torch.ones(3, 3), '["block_0", "momentum"]': torch.arange(4.0),
        }},
        "param_groups": {"fc.weight": {"lr": 0.5}},
    }


def _zeroed(node: object) -> object:
    if isinstance(node, dict):
        return {key: _zeroed(value) for key, value in node.items()}
    return torch.zeros_like(node) if isinstance(node, torch.Tensor) else 0.0


class FlattenedMappingTest(ScratchDirTest):
    """A mapping keyed by JSON lists is stored as the nesting it spells."""

    def test_flattened_and_nested_save_the_same_checkpoint(self) -> None:
        save_checkpoint(self.root / "nested", _nested_state())
        save_checkpoint(self.root / "flat", _flattened_state())
        nested, flat = read_checkpoint_index(self.root / "nested"), read_checkpoint_index(self.root / "flat")
        self.assertEqual(flat.weight_map, nested.weight_map)
        self.assertIn('["state", "fc.weight", "block_0", "shampoo", "factor_matrices", 1]', flat.weight_map)
        self.assertEqual((flat.objects, flat.containers), (nested.objects, nested.containers))
        # A whole load returns the nesting (``flatten`` of a parameter's state gives the saved keys back).
        loaded = load_checkpoint(self.root / "flat")
        self.assertEqual(sorted(flatten(loaded)), sorted(flatten(_nested_state())))
        verify_checkpoint(self.root / "flat")

    @parameterized.expand([("nested_into_flattened", "nested", _flattened_state), ("flattened_into_nested", "flat", _nested_state)])
    def test_each_form_loads_into_the_other(self, _name: str, saved: str, template_of: Callable[[], dict[str, object]]) -> None:
        save_checkpoint(self.root / "nested", _nested_state())
        save_checkpoint(self.root / "flat", _flattened_state())
        template = _zeroed(template_of())
        assert isinstance(template, dict)
        load_checkpoint(self.root / saved, template)
        expected = template_of()
        self.assertEqual(list(flatten(template)), list(flatten(expected)))
        for (name, value), want in zip(flatten(template).items(), flatten(expected).values()):
            self.assertTrue(torch.equal(value, want) if isinstance(want, torch.Tensor) else value == want, name)  # pyre-ignore[6]

    def test_keys_select_inside_a_flattened_mapping(self) -> None:
        save_checkpoint(self.root / "ckpt", _nested_state())
        template = _zeroed(_flattened_state())
        assert isinstance(template, dict)
        load_checkpoint(self.root / "ckpt", template, keys=[("state", "fc.weight", "block_0", "shampoo")])
        state = template["state"]["fc.weight"]
        self.assertTrue(torch.equal(state['["block_0", "shampoo", "factor_matrices", 1]'], torch.ones(3, 3)))
        self.assertTrue(torch.equal(state['["block_0", "momentum"]'], torch.zeros(4)))  # not selected: untouched

    def test_a_missing_flattened_leaf_is_named_by_its_path(self) -> None:
        save_checkpoint(self.root / "ckpt", _nested_state())
        template = _zeroed(_flattened_state())
        assert isinstance(template, dict)
        template["state"]["fc.weight"]['["block_1", "momentum"]'] = torch.zeros(4)
        with self.assertRaisesRegex(MissingKeyError, r'holds no value for 1 template keys: \["state", "fc.weight", "block_1", "momentum"\]'):
            load_checkpoint(self.root / "ckpt", template)

    def test_keys_spelled_otherwise_name_the_same_leaves(self) -> None:
        # A canonically spelled key is reused as the names' text; any other spelling of the same
        # path (no space after the comma, a literal non-ASCII character) is named component by component.
        saved = {"s": {"block_0": {"m": torch.ones(2), "\u00e9": torch.full((1,), 2.0)}, "step": torch.full((1,), 3.0)}}
        save_checkpoint(self.root / "ckpt", saved)
        template: dict[str, object] = {
            "s": {'["block_0","m"]': torch.zeros(2), '["block_0", "\u00e9"]': torch.zeros(1), '["step"]': torch.zeros(1)}
        }
        load_checkpoint(self.root / "ckpt", template)
        state = template["s"]
        assert isinstance(state, dict)
        self.assertTrue(torch.equal(state['["block_0","m"]'], torch.ones(2)))
        self.assertTrue(torch.equal(state['["block_0", "\u00e9"]'], torch.full((1,), 2.0)))
        self.assertTrue(torch.equal(state['["step"]'], torch.full((1,), 3.0)))

    def test_a_mapping_with_other_keys_too_is_not_flattened(self) -> None:
        save_checkpoint(self.root / "ckpt", {"m": {'["a"]': torch.ones(1), "b": torch.zeros(1)}})
        self.assertEqual(sorted(read_checkpoint_index(self.root / "ckpt").tensors), ['["m", "[\\"a\\"]"]', '["m", "b"]'])


class TensorBytesTest(unittest.TestCase):
    """``tensor_bytes`` gives a tensor's values as row-major bytes, whichever path it takes."""

    @parameterized.expand(
        [
            ("contiguous", lambda: torch.arange(12.0).reshape(3, 4)),
            ("bfloat16", lambda: torch.arange(12.0).reshape(3, 4).to(torch.bfloat16)),
            ("requires_grad", lambda: torch.arange(12.0, requires_grad=True)),
            ("contiguous_view_at_an_offset", lambda: torch.arange(20.0)[5:17].view(3, 4)),
            ("float8", lambda: torch.arange(12.0).to(torch.float8_e4m3fn)),
            ("transposed", lambda: torch.arange(12.0).reshape(3, 4).t()),
            ("conjugate", lambda: torch.complex(torch.arange(3.0), torch.ones(3)).conj()),
            ("zero_dim", lambda: torch.tensor(7, dtype=torch.int16)),
            ("empty", lambda: torch.zeros(0, 5)),
        ]
    )
    def test_values_as_row_major_bytes(self, _name: str, make: Callable[[], torch.Tensor]) -> None:
        tensor = make()
        expected = tensor.detach().resolve_conj().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        self.assertEqual(bytes(tensor_bytes(tensor)), expected)

    def test_a_contiguous_tensor_is_viewed_in_place_and_kept_alive_by_its_view(self) -> None:
        view = shared_bytes(torch.arange(12.0).reshape(3, 4)[1:].to(torch.bfloat16))  # the tensor's only reference
        self.assertIsNotNone(view)
        assert view is not None
        churn = [torch.full((8,), -1.0, dtype=torch.bfloat16) for _ in range(100)]  # would reuse freed memory
        self.assertEqual(bytes(view), torch.arange(4.0, 12.0).to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
        target = torch.zeros(2, 3)
        filled = shared_bytes(target)
        assert filled is not None
        filled[:] = torch.arange(6.0).numpy().tobytes()  # a load reads into this view
        self.assertTrue(torch.equal(target, torch.arange(6.0).reshape(2, 3)))
        self.assertEqual(len(churn), 100)


class WriteSafetensorsTest(ScratchDirTest):
    """Tensors written from their own memory are hashed while the file is fsynced, copies before
    they are written: the records must not depend on which."""

    def test_records_hold_every_tensors_checksum_in_the_files_order(self) -> None:
        base = torch.arange(3 * 2**18, dtype=torch.float32).reshape(3, 2**18)  # 3 MiB: page checksums
        tensors = [
            ("shared_paged", base),
            ("copied_transposed", base[:, :8].t()),
            ("copied_bfloat16", torch.arange(6.0).to(torch.bfloat16)),
            ("shared_small", torch.arange(5, dtype=torch.int64)),
        ]
        written = write_safetensors(self.root / "f.safetensors", tensors, {})
        data = (self.root / "f.safetensors").read_bytes()
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        header.pop("__metadata__")
        self.assertEqual(list(written.checksums), sorted(header, key=lambda name: header[name]["data_offsets"]))
        self.assertEqual(written.checksums, {name: checksum(tensor_bytes(t)) for name, t in tensors})
        self.assertEqual(list(written.pages), ["shared_paged"])
        self.assertEqual(written.pages["shared_paged"], checksums_of(tensor_bytes(base))[1])

    def test_a_failed_fsync_fails_the_wait_and_removes_the_file(self) -> None:
        path = self.root / "f.safetensors"
        tensor = torch.arange(4.0)
        with mock.patch("distributed_shampoo.checkpoint.writer.os.fsync", side_effect=OSError(errno.EIO, "Input/output error")):
            syncing = start_safetensors(path, [("a", tensor)], {})
            self.assertEqual(syncing.record.checksums, {"a": checksum(tensor_bytes(tensor))})  # hashed before the wait
            for _ in range(2):  # a later call repeats the failure
                with self.assertRaisesRegex(OSError, "Input/output error"):
                    syncing.wait_durable()
        self.assertFalse(path.exists())


class FormatTest(unittest.TestCase):
    def test_sealed_text_with_trailing_newlines_is_still_sealed(self) -> None:
        text = seal({"metadata": {"x": 1}, "weight_map": {}}).encode()
        digest = sealed_digest(text)
        self.assertIsNotNone(digest)
        self.assertEqual(sealed_digest(text + b"\n\n"), digest)
        self.assertIsNone(sealed_digest(text.replace(b'"x":1', b'"x":2')))

    def test_hf_compatible_layout(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / "ckpt"
            old_umask = os.umask(0o022)
            try:
                save_checkpoint(
                    directory, {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.float16), "n": 1},
                    prefix="model",
                )
            finally:
                os.umask(old_umask)
            self.assertEqual(
                sorted(os.listdir(directory)),
                ["model-00001-of-00001.safetensors", "model.safetensors.index.json"],  # small: no loader's files
            )
            index = json.loads((directory / "model.safetensors.index.json").read_text())
            self.assertEqual(
                index["weight_map"],
                {'["a"]': "model-00001-of-00001.safetensors", '["b"]': "model-00001-of-00001.safetensors"},
            )
            self.assertEqual(index["metadata"]["total_size"], 6 * 4 + 2 * 2)
            self.assertEqual(index["metadata"]["format_version"], 3)
            self.assertEqual(index["metadata"]["objects"], {'["n"]': 1})
            shard = directory / "model-00001-of-00001.safetensors"
            self.assertEqual(stat.S_IMODE(shard.stat().st_mode), 0o644)
            with safe_open(str(shard), framework="pt") as reader:
                self.assertEqual(reader.metadata()["format"], "pt")
                self.assertTrue(torch.equal(reader.get_tensor('["a"]'), torch.arange(6.0).reshape(2, 3)))
                self.assertTrue(torch.equal(reader.get_slice('["a"]')[1:], torch.tensor([[3.0, 4.0, 5.0]])))
            verify_checkpoint(directory)


    def test_loader_files_are_written_from_the_threshold_on(self) -> None:
        state = {"a": torch.arange(6.0).reshape(2, 3), "b": {"c": torch.ones(2, dtype=torch.float16)}, "n": 1}
        with tempfile.TemporaryDirectory() as tmp:
            probe = save_checkpoint(Path(tmp) / "probe", state)
            index_bytes = (probe / "optimizer.safetensors.index.json").stat().st_size
            for threshold, written in [(index_bytes + 1, False), (index_bytes, True)]:
                directory = Path(tmp) / f"ckpt-{threshold}"
                with mock.patch.object(index_parts, "LOADER_FILES_MIN_INDEX_BYTES", threshold):
                    save_checkpoint(directory, state)
                    verify_checkpoint(directory)
                loader = {"optimizer.lookup.bin", "optimizer.manifest.json", "optimizer.part-00001-of-00001.json"}
                self.assertEqual(loader <= set(os.listdir(directory)), written)
                self.assertEqual(len(os.listdir(directory)), 2 + 3 * written)
                template = {"a": torch.zeros(2, 3), "b": {"c": torch.zeros(2, dtype=torch.float16)}, "n": 0}
                load_checkpoint(directory, template)
                self.assertEqual(_structure(template), _structure(state))


def _structure(value: object) -> object:
    """A comparable rendering: tensors by dtype, shape and bytes; containers by type."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape), bytes(value.contiguous().reshape(-1).view(torch.uint8).numpy()))
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_structure(v) for v in value])
    return (type(value).__name__, value)
