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
    param_key_path,
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

    @parameterized.expand([(True, 11), (False, 10)])
    def test_bias_flag_and_repr(self, bias: bool, width: int) -> None:
        layer = CombinedLinear(10, 20, bias=bias, dtype=torch.float64)
        self.assertIs(layer.bias, bias)
        self.assertEqual(layer.in_features_with_bias, width)
        self.assertEqual(layer.combined_weight.dtype, torch.float64)
        self.assertEqual(layer.extra_repr(), f"self.in_features=10, self.out_features=20, self.in_features_with_bias={width}")

    @parameterized.expand([(True,), (False,)])
    def test_gradients_match_nn_linear(self, bias: bool) -> None:
        torch.manual_seed(3)
        layer, reference = CombinedLinear(6, 4, bias=bias), nn.Linear(6, 4, bias=bias)
        with torch.no_grad():
            reference.weight.copy_(layer.combined_weight[:, :6])
            if bias:
                reference.bias.copy_(layer.combined_weight[:, 6])
        x = torch.randn(5, 6)
        layer(x).square().sum().backward()
        reference(x).square().sum().backward()
        grad = layer.combined_weight.grad
        assert grad is not None and reference.weight.grad is not None
        torch.testing.assert_close(grad[:, :6], reference.weight.grad)
        if bias:
            assert reference.bias.grad is not None
            torch.testing.assert_close(grad[:, 6], reference.bias.grad)


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

    def test_every_json_scalar_is_a_key(self) -> None:
        t = torch.ones(1)
        nested: dict[object, object] = {"123": {123: {0.1: {True: {None: t}}}}}
        flattened = flatten(nested)  # pyre-ignore[6]
        self.assertEqual(list(flattened), ['["123", 123, 0.1, true, null]'])
        self.assertEqual(unflatten(flattened), nested)

    def test_bad_keys(self) -> None:
        with self.assertRaisesRegex(TypeError, r"flatten: keys must be JSON scalars .*got \(1, 2\) \(tuple\)"):
            flatten({(1, 2): 1})  # pyre-ignore[6]

    def test_unflatten_errors(self) -> None:
        with self.assertRaisesRegex(ValueError, "not a JSON-list key"):
            unflatten({"model.weight": 1})
        with self.assertRaisesRegex(ValueError, "not a JSON list of scalars"):
            unflatten({'{"a": 1}': 1})
        with self.assertRaisesRegex(ValueError, "not a JSON list of scalars"):
            unflatten({'[["a"]]': 1})
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
        with self.assertRaisesRegex(KeyError, r'Key b not found in state dict to load. \(at \[\\?"a\\?", \\?"b\\?"\]\)'):
            update_param_state_dict_object(current, {"a": {}, "c": 2})
        with self.assertLogs("distributed_shampoo.utils.shampoo_checkpoint_utils", level="WARNING"):
            update_param_state_dict_object(current, {"a": {}, "c": 2}, enable_missing_key_check=False)
        self.assertEqual(current["c"], 2)

    def test_plain_values_are_replaced_by_copies(self) -> None:
        loaded = ["value"]
        current: dict[str | int, object] = {"v": []}
        update_param_state_dict_object(current, {"v": loaded})
        self.assertEqual(current["v"], ["value"])
        self.assertIsNot(current["v"], loaded)

    def test_shape_mismatch(self) -> None:
        with self.assertRaisesRegex(ValueError, r'\["t"\] expects a tensor of shape \(3,\), got \(2,\)'):
            update_param_state_dict_object({"t": torch.zeros(3)}, {"t": torch.zeros(2)})


class ParamKeyPathTest(unittest.TestCase):
    def test_the_path_up_to_the_parameter_name(self) -> None:
        self.assertEqual(param_key_path(["optimizer", "state", "fc.weight", "block_0"]), ("optimizer", "state", "fc.weight"))
        self.assertEqual(param_key_path(["state", 3, "step"]), ("state", 3))
        self.assertIsNone(param_key_path(["model", "w"]))
        self.assertIsNone(param_key_path(["state"]))
