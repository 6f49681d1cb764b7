# pyre-strict
import unittest

import torch
from parameterized import parameterized
from torch import nn

from distributed_shampoo.utils.optimizer_modules import OptimizerModule
from distributed_shampoo.utils.shampoo_checkpoint_utils import (
    decode_key,
    encode_key,
    extract_state_dict_content,
    flatten,
    unflatten,
    update_param_state_dict_object,
)
from distributed_shampoo.utils.shampoo_model_utils import CombinedLinear


class CombinedLinearTest(unittest.TestCase):
    @parameterized.expand([(True,), (False,)])
    def test_matches_nn_linear(self, bias: bool) -> None:
        torch.manual_seed(0)
        layer = CombinedLinear(5, 3, bias=bias)
        self.assertEqual(tuple(layer.combined_weight.shape), (3, 5 + int(bias)))
        reference = nn.Linear(5, 3, bias=bias)
        with torch.no_grad():
            reference.weight.copy_(layer.combined_weight[:, :5])
            if bias:
                reference.bias.copy_(layer.combined_weight[:, 5])
        x = torch.randn(7, 5)
        self.assertTrue(torch.equal(layer(x), reference(x)))

    def test_initialisation_matches_nn_linear(self) -> None:
        torch.manual_seed(1)
        layer = CombinedLinear(4, 2)
        torch.manual_seed(1)
        reference = nn.Linear(4, 2)
        self.assertTrue(torch.equal(layer.combined_weight[:, :4], reference.weight))
        self.assertEqual(list(layer.parameters()), [layer.combined_weight])

    def test_gradient_reaches_combined_weight(self) -> None:
        layer = CombinedLinear(4, 2)
        layer(torch.randn(3, 4)).sum().backward()
        grad = layer.combined_weight.grad
        assert grad is not None
        self.assertTrue(torch.equal(grad[:, 4], torch.full((2,), 3.0)))

    def test_bad_sizes(self) -> None:
        with self.assertRaisesRegex(ValueError, "must be >= 1, got 0 and 2"):
            CombinedLinear(0, 2)


class FlattenTest(unittest.TestCase):
    def test_round_trip_with_int_keys(self) -> None:
        t1, t2, t3 = torch.zeros(1), torch.ones(2), torch.tensor(100)
        nested: dict[str | int, object] = {"model": {"layer1": {"weight": t1, "bias": t2}}, "optimizer": {"step": t3, 0: {1: "x"}, "lrs": [0.1]}}
        flattened = flatten(nested)
        self.assertEqual(
            list(flattened),
            [
                '["model", "layer1", "weight"]',
                '["model", "layer1", "bias"]',
                '["optimizer", "step"]',
                '["optimizer", 0, 1]',
                '["optimizer", "lrs"]',
            ],
        )
        self.assertIs(flattened['["model", "layer1", "weight"]'], t1)
        restored = unflatten(flattened)
        self.assertEqual(restored, nested)
        self.assertIn(0, restored["optimizer"])  # pyre-ignore[6]: a dict at runtime.

    def test_empty_dicts_disappear(self) -> None:
        self.assertEqual(flatten({"a": {}, "b": 1}), {'["b"]': 1})
        self.assertEqual(flatten({}), {})
        self.assertEqual(unflatten({}), {})

    @parameterized.expand([((1, 2),), (1.5,), (True,), (None,)])
    def test_bad_keys(self, key: object) -> None:
        with self.assertRaisesRegex(TypeError, "state dict keys must be str or int"):
            flatten({key: 1})  # pyre-ignore[6]

    def test_unflatten_errors(self) -> None:
        with self.assertRaisesRegex(ValueError, "not a JSON-list key"):
            unflatten({"model.weight": 1})
        with self.assertRaisesRegex(ValueError, "not a JSON list of str and int"):
            unflatten({'{"a": 1}': 1})
        with self.assertRaisesRegex(ValueError, "conflicts"):
            unflatten({'["a"]': 1, '["a", "b"]': 2})
        with self.assertRaisesRegex(ValueError, "empty key path"):
            unflatten({"[]": 1})

    def test_encode_decode(self) -> None:
        self.assertEqual(encode_key(["state", 3, "é"]), '["state", 3, "\\u00e9"]')
        self.assertEqual(decode_key(encode_key(["state", 3, "é"])), ["state", 3, "é"])


class _Module(OptimizerModule):
    def __init__(self) -> None:
        self.factor: torch.Tensor = torch.zeros(2)


class StateDictObjectTest(unittest.TestCase):
    def test_extract_state_dict_content(self) -> None:
        module = _Module()
        tensor = torch.ones(1)
        content = extract_state_dict_content({"p": {"module": module, "t": tensor, "step": 3}})
        self.assertEqual(set(content["p"]), {"module", "t", "step"})  # pyre-ignore[6]
        # The module state is its own storage (detached), not a copy.
        self.assertEqual(content["p"]["module"]["factor"].data_ptr(), module.factor.data_ptr())  # pyre-ignore[16]
        self.assertIs(content["p"]["t"], tensor)

    def test_update_in_place(self) -> None:
        tensor, module = torch.zeros(3), _Module()
        current: dict[str | int, object] = {"t": tensor, "m": module, "nested": {"step": 1}}
        update_param_state_dict_object(
            current, {"t": torch.ones(3), "m": {"factor": torch.full((2,), 2.0)}, "nested": {"step": 5}, "extra": 0}
        )
        self.assertIs(current["t"], tensor)
        self.assertTrue(torch.equal(tensor, torch.ones(3)))
        self.assertTrue(torch.equal(module.factor, torch.full((2,), 2.0)))
        self.assertEqual(current["nested"], {"step": 5})
        self.assertNotIn("extra", current)

    def test_missing_key_check(self) -> None:
        current: dict[str | int, object] = {"a": {"b": torch.zeros(1)}, "c": 1}
        with self.assertRaisesRegex(KeyError, r'missing key \[\\"a\\", \\"b\\"\]|missing key \["a", "b"\]'):
            update_param_state_dict_object(current, {"a": {}, "c": 2})
        update_param_state_dict_object(current, {"a": {}, "c": 2}, enable_missing_key_check=False)
        self.assertEqual(current["c"], 2)

    def test_shape_mismatch(self) -> None:
        with self.assertRaisesRegex(ValueError, r'\["t"\] expects a tensor of shape \(3,\), got \(2,\)'):
            update_param_state_dict_object({"t": torch.zeros(3)}, {"t": torch.zeros(2)})
