# pyre-strict
import unittest

import torch

from distributed_shampoo.utils.optimizer_modules import OptimizerModule


class _Inner(OptimizerModule):
    def __init__(self) -> None:
        self.accumulator: torch.Tensor = torch.zeros(2, 3)
        self.count = 0


class _Outer(OptimizerModule):
    def __init__(self) -> None:
        self.weight: torch.Tensor = torch.ones(4, requires_grad=True)
        self.inner = _Inner()
        self.factors: list[torch.Tensor] = [torch.zeros(2), torch.zeros(3)]
        self.pair: tuple[torch.Tensor, _Inner] = (torch.zeros(1), _Inner())
        self.named: dict[str, torch.Tensor] = {"a": torch.zeros(2)}
        self.lr = 0.1
        self.betas = (0.9, 0.99)


class OptimizerModuleTest(unittest.TestCase):
    def test_state_dict_is_recursive_and_detached(self) -> None:
        module = _Outer()
        state = module.state_dict()
        self.assertEqual(set(state), {"weight", "inner", "factors", "pair", "named"})
        self.assertEqual(set(state["inner"]), {"accumulator"})  # pyre-ignore[6]
        self.assertEqual(set(state["factors"]), {0, 1})  # pyre-ignore[6]
        self.assertEqual(set(state["pair"]), {0, 1})  # pyre-ignore[6]
        weight = state["weight"]
        assert isinstance(weight, torch.Tensor)
        self.assertFalse(weight.requires_grad)
        self.assertEqual(weight.data_ptr(), module.weight.data_ptr())

    def test_keep_vars_keeps_autograd_tensors(self) -> None:
        module = _Outer()
        self.assertIs(module.state_dict(keep_vars=True)["weight"], module.weight)

    def test_store_non_tensors_includes_plain_values(self) -> None:
        state = _Outer().state_dict(store_non_tensors=True)
        self.assertEqual(state["lr"], 0.1)
        self.assertEqual(state["betas"], {0: 0.9, 1: 0.99})
        self.assertEqual(state["inner"]["count"], 0)  # pyre-ignore[16]

    def test_load_state_dict_copies_in_place(self) -> None:
        source, target = _Outer(), _Outer()
        with torch.no_grad():
            source.inner.accumulator.fill_(3.0)
            source.factors[1].fill_(5.0)
            source.pair[1].accumulator.fill_(7.0)
            source.named["a"].fill_(9.0)
        source.lr = 0.5
        source.betas = (0.1, 0.2)
        accumulator, factor, pair = target.inner.accumulator, target.factors[1], target.pair
        target.load_state_dict(source.state_dict(store_non_tensors=True), store_non_tensors=True)
        self.assertIs(target.inner.accumulator, accumulator)
        self.assertIs(target.factors[1], factor)
        self.assertTrue(torch.equal(accumulator, torch.full((2, 3), 3.0)))
        self.assertTrue(torch.equal(factor, torch.full((3,), 5.0)))
        self.assertTrue(torch.equal(target.pair[1].accumulator, torch.full((2, 3), 7.0)))
        self.assertIs(target.pair[1], pair[1])
        self.assertTrue(torch.equal(target.named["a"], torch.full((2,), 9.0)))
        self.assertEqual(target.lr, 0.5)
        self.assertEqual(target.betas, (0.1, 0.2))
        self.assertIsInstance(target.betas, tuple)

    def test_missing_and_unexpected_keys_raise(self) -> None:
        state = _Outer().state_dict()
        del state["weight"]
        state["extra"] = torch.zeros(1)
        with self.assertRaisesRegex(KeyError, r"_Outer: missing keys \['weight'\], unexpected keys \['extra'\]"):
            _Outer().load_state_dict(state)

    def test_shape_mismatch_raises_naming_path(self) -> None:
        state = _Outer().state_dict()
        state["factors"] = {0: torch.zeros(2), 1: torch.zeros(4)}
        with self.assertRaisesRegex(ValueError, r"_Outer.factors\[1\]: shape \(4,\) does not match \(3,\)"):
            _Outer().load_state_dict(state)
