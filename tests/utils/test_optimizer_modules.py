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
        # Containers of plain values stay, as empty dicts; plain values are left out.
        self.assertEqual(set(state), {"weight", "inner", "factors", "pair", "named", "betas"})
        self.assertEqual(state["betas"], {})
        self.assertEqual(set(state["inner"]), {"accumulator"})  # pyre-ignore[6]
        self.assertEqual(set(state["factors"]), {0, 1})  # pyre-ignore[6]
        self.assertEqual(set(state["pair"]), {0, 1})  # pyre-ignore[6]
        weight = state["weight"]
        assert isinstance(weight, torch.Tensor)
        self.assertFalse(weight.requires_grad)
        self.assertEqual(weight.data_ptr(), module.weight.data_ptr())

    def test_keep_vars_keeps_autograd_tensors_and_destination_is_filled(self) -> None:
        module = _Outer()
        self.assertIs(module.state_dict(keep_vars=True)["weight"], module.weight)
        destination: dict[object, object] = {"kept": 1}
        self.assertIs(module.state_dict(destination=destination), destination)
        self.assertEqual(destination["kept"], 1)
        self.assertIn("weight", destination)

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

    def test_without_store_non_tensors_plain_values_keep_their_values(self) -> None:
        source, target = _Outer(), _Outer()
        source.lr, source.betas = 0.5, (0.1, 0.2)
        target.load_state_dict(source.state_dict(store_non_tensors=True))
        self.assertEqual((target.lr, target.betas), (0.1, (0.9, 0.99)))

    def test_missing_keys_keep_their_values_and_mismatched_kinds_are_skipped_with_a_warning(self) -> None:
        module = _Outer()
        state = module.state_dict(store_non_tensors=True)
        del state["weight"]
        state["named"] = torch.zeros(2)  # a tensor where the module holds a dict
        state["lr"] = "fast"  # a str where the module holds a float
        state["inner"] = {"accumulator": 5, "count": 3}  # not a tensor for the accumulator
        with self.assertLogs("distributed_shampoo.utils.optimizer_modules", level="WARNING") as logs:
            module.load_state_dict(state, store_non_tensors=True)
        self.assertEqual(len(logs.output), 3)
        self.assertTrue(torch.equal(module.weight, torch.ones(4)))
        self.assertEqual(set(module.named), {"a"})
        self.assertEqual(module.lr, 0.1)
        self.assertTrue(torch.equal(module.inner.accumulator, torch.zeros(2, 3)))
        self.assertEqual(module.inner.count, 3)
