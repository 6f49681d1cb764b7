# pyre-strict
import unittest

import torch
from parameterized import parameterized

from distributed_shampoo.utils.shampoo_block_info import BlockInfo
from distributed_shampoo.utils.shampoo_quantization import (
    DequantizeQuantizedTensorListContext,
    QuantizedTensor,
    QuantizedTensorList,
)

_PAIRS: list[tuple[torch.dtype, torch.dtype]] = [
    (q, c)
    for q in (torch.bfloat16, torch.float16, torch.float32)
    for c in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
]


class QuantizedTensorTest(unittest.TestCase):
    @parameterized.expand(_PAIRS)
    def test_round_trip_rounds_to_storage_dtype(self, quantized: torch.dtype, computation: torch.dtype) -> None:
        values = torch.randn(4, 5, dtype=torch.float64)
        tensor = QuantizedTensor.init_from_dequantized_tensor(values, quantized)
        self.assertEqual(tensor.quantized_values.dtype, quantized)
        dequantized = tensor.dequantize(computation)
        self.assertEqual(dequantized.dtype, computation)
        self.assertTrue(torch.equal(dequantized, values.to(quantized).to(computation)))
        tensor.quantize_(values * 2)
        self.assertTrue(torch.equal(tensor.quantized_values, (values * 2).to(quantized)))

    def test_block_info_allocates_storage(self) -> None:
        allocated: list[tuple[int, ...]] = []

        def allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            allocated.append(shape)
            return torch.zeros(shape, dtype=dtype, device=device)

        info = BlockInfo(param=torch.zeros(3), composable_block_ids=(0, "block_0"), allocate_zeros_tensor=allocate)
        tensor = QuantizedTensor.init_from_dequantized_tensor(torch.ones(3), torch.bfloat16, info)
        self.assertEqual(allocated, [(3,)])
        self.assertIs(tensor.block_info, info)

    def test_errors(self) -> None:
        with self.assertRaisesRegex(ValueError, "quantized dtype must be one of"):
            QuantizedTensor(torch.zeros(2, dtype=torch.int8))
        with self.assertRaisesRegex(ValueError, "computation dtype must be a floating point dtype"):
            QuantizedTensor(torch.zeros(2)).dequantize(torch.int32)
        with self.assertRaisesRegex(ValueError, r"shape \(3,\) does not match \(2,\)"):
            QuantizedTensor(torch.zeros(2)).quantize_(torch.zeros(3))


class QuantizedTensorListTest(unittest.TestCase):
    @parameterized.expand(_PAIRS)
    def test_dequantize_compute_quantize(self, quantized: torch.dtype, computation: torch.dtype) -> None:
        sources = [torch.randn(3, 3), torch.randn(2)]
        expected_values = [(s.to(quantized).to(computation) * 2).to(quantized) for s in sources]
        qlist = QuantizedTensorList([(t, None, None) for t in sources], quantized, computation)
        self.assertEqual(len(qlist), 2)
        self.assertEqual([t.dtype for t in qlist.quantized_value], [quantized, quantized])
        self.assertFalse(qlist.is_dequantized_stored())
        with DequantizeQuantizedTensorListContext(qlist):
            self.assertTrue(qlist.is_dequantized_stored())
            self.assertEqual([t.dtype for t in qlist.dequantized_value], [computation, computation])
            for t in qlist.dequantized_value:
                t.mul_(2)
        self.assertFalse(qlist.is_dequantized_stored())
        for stored, expected in zip(qlist.quantized_value, expected_values):
            self.assertTrue(torch.equal(stored, expected))

    def test_same_dtype_keeps_identity_and_aliases(self) -> None:
        source = torch.zeros(2)
        qlist = QuantizedTensorList([source], torch.float32, torch.float32)
        self.assertIs(qlist.quantized_value[0], source)
        qlist.dequantize_()
        self.assertIs(qlist.dequantized_value[0], source)
        qlist.quantize_()

    def test_compress_shares_storage(self) -> None:
        qlist = QuantizedTensorList([torch.zeros(1), torch.zeros(2), torch.zeros(3)], torch.bfloat16)
        qlist.dequantize_()
        compressed = qlist.compress((True, False, True))
        self.assertEqual([t.numel() for t in compressed.quantized_value], [1, 3])
        self.assertIs(compressed.quantized_value[1], qlist.quantized_value[2])
        self.assertIs(compressed.dequantized_value[0], qlist.dequantized_value[0])
        with self.assertRaisesRegex(AssertionError, "Inconsistent lengths between complete_list 3 and selector 2!"):
            qlist.compress((True, False))

    def test_empty_list(self) -> None:
        qlist = QuantizedTensorList([], torch.float16)
        with DequantizeQuantizedTensorListContext(qlist):
            self.assertEqual(qlist.dequantized_value, ())

    def test_errors(self) -> None:
        with self.assertRaisesRegex(RuntimeError, r"only available after dequantize_\(\)"):
            QuantizedTensorList([torch.zeros(1)], torch.float16).dequantized_value
        with self.assertRaisesRegex(ValueError, "integer quantization"):
            QuantizedTensorList([(torch.zeros(1), torch.zeros(1), None)], torch.float16)
        with self.assertRaisesRegex(ValueError, "quantized dtype must be one of"):
            QuantizedTensorList([torch.zeros(1)], torch.float64)
