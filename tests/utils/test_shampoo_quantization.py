# pyre-strict
import unittest
from unittest import mock

import torch
from parameterized import parameterized

from distributed_shampoo.distributor.shampoo_block_info import BlockInfo
from distributed_shampoo.utils import shampoo_quantization
from distributed_shampoo.utils.shampoo_quantization import (
    _FLOAT_DTYPES,
    DequantizeQuantizedTensorListContext,
    QuantizedTensor,
    QuantizedTensorList,
)

_PAIRS: list[tuple[torch.dtype, torch.dtype]] = [(q, c) for q in _FLOAT_DTYPES for c in _FLOAT_DTYPES]


def _info(index: int = 0) -> BlockInfo:
    return BlockInfo(torch.zeros(3), (index, "block_0"))


class QuantizedTensorTest(unittest.TestCase):
    @parameterized.expand(_PAIRS)
    def test_round_trip_rounds_to_storage_dtype(self, quantized: torch.dtype, computation: torch.dtype) -> None:
        values = torch.randn(4, 5, dtype=torch.float64)
        tensor = QuantizedTensor.init_from_dequantized_tensor(values, quantized, _info())
        self.assertEqual(tensor.quantized_values.dtype, quantized)
        self.assertIsNone(tensor.min_value)
        self.assertIsNone(tensor.max_value)
        dequantized = tensor.dequantize(computation)
        self.assertEqual(dequantized.dtype, computation)
        self.assertTrue(torch.equal(dequantized, values.to(quantized).to(computation)))
        if quantized == computation:
            self.assertIs(dequantized, tensor.quantized_values)  # no copy when the dtypes agree
        tensor.quantize(values * 2)
        self.assertTrue(torch.equal(tensor.quantized_values, (values * 2).to(quantized)))

    def test_block_info_allocates_storage_and_is_an_optimizer_module(self) -> None:
        allocated: list[tuple[int, ...]] = []

        def allocate(size: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            allocated.append(tuple(size))
            return torch.zeros(size, dtype=dtype, device=device)

        info = BlockInfo(param=torch.zeros(3), composable_block_ids=(0, "block_0"), allocate_zeros_tensor=allocate)
        tensor = QuantizedTensor.init_from_dequantized_tensor(torch.ones(3), torch.bfloat16, info)
        self.assertEqual(allocated, [(3,)])
        self.assertIs(tensor.block_info, info)
        self.assertTrue(torch.equal(tensor.state_dict()["quantized_values"], torch.ones(3, dtype=torch.bfloat16)))  # pyre-ignore[6]

    def test_block_info_helpers(self) -> None:
        info = _info()
        self.assertTrue(torch.equal(info.allocate_ones_tensor(2), torch.ones(2)))
        self.assertTrue(torch.equal(info.allocate_eye_tensor(2), torch.eye(2)))
        tensor = torch.zeros(1)
        self.assertIs(info.get_tensor(tensor), tensor)

    def test_integer_storage_is_not_implemented(self) -> None:
        with self.assertRaisesRegex(NotImplementedError, r"^Quantization for torch.int8 is not yet supported!$"):
            QuantizedTensor.init_from_dequantized_tensor(torch.ones(2), torch.int8, _info())
        zeros = QuantizedTensor(torch.zeros(2, dtype=torch.int8), _info())
        self.assertTrue(torch.equal(zeros.min_value, torch.zeros(1)))  # pyre-ignore[6]
        with self.assertRaisesRegex(NotImplementedError, r"^Quantization for torch.int8 is not yet supported!$"):
            zeros.dequantize(torch.float32)
        with self.assertRaisesRegex(ValueError, "float storage .* takes no min/max values"):
            QuantizedTensor(torch.zeros(2), _info(), torch.zeros(1), torch.ones(1))
        with self.assertRaisesRegex(ValueError, "integer storage with values needs its min/max values"):
            QuantizedTensor(torch.ones(2, dtype=torch.int8), _info())


class QuantizedTensorListTest(unittest.TestCase):
    @parameterized.expand(_PAIRS)
    def test_dequantize_compute_quantize(self, quantized: torch.dtype, computation: torch.dtype) -> None:
        sources = [torch.randn(3, 3).to(quantized), torch.randn(2).to(quantized)]
        expected_values = [(s.to(computation) * 2).to(quantized) for s in sources]
        qlist = QuantizedTensorList([(t, None, None) for t in sources], quantized, computation)
        self.assertEqual(len(qlist), 2)
        self.assertIs(qlist.quantized_value[0], sources[0])  # stored, not copied
        self.assertFalse(qlist.is_dequantized_stored())
        with DequantizeQuantizedTensorListContext(qlist):
            self.assertTrue(qlist.is_dequantized_stored())
            self.assertEqual([t.dtype for t in qlist.dequantized_value], [computation, computation])
            for t in qlist.dequantized_value:
                t.mul_(2)
        self.assertFalse(qlist.is_dequantized_stored())
        for stored, expected in zip(qlist.quantized_value, expected_values):
            self.assertTrue(torch.equal(stored, expected))

    def test_from_quantized_tensors(self) -> None:
        tensors = [QuantizedTensor(torch.full((2,), float(i), dtype=torch.float16), _info(i)) for i in range(3)]
        qlist = QuantizedTensorList(tensors, torch.float16, torch.float64)
        self.assertEqual([t.data_ptr() for t in qlist.quantized_value], [t.quantized_values.data_ptr() for t in tensors])

    def test_compress_shares_storage(self) -> None:
        qlist = QuantizedTensorList([(torch.zeros(n), None, None) for n in (1, 2, 3)], torch.float32)
        compressed = qlist.compress((True, False, True))
        self.assertEqual([t.numel() for t in compressed.quantized_value], [1, 3])
        self.assertIs(compressed.quantized_value[1], qlist.quantized_value[2])
        with self.assertRaisesRegex(AssertionError, "Inconsistent lengths between complete_list 3 and selector 2!"):
            qlist.compress((True, False))
        qlist.dequantize_()
        with self.assertRaisesRegex(AssertionError, "needs the dequantized values quantized first"):
            qlist.compress((True, False, True))

    def test_warnings_of_the_in_place_protocol(self) -> None:
        qlist = QuantizedTensorList([(torch.zeros(2, dtype=torch.float16), None, None)], torch.float16, torch.float64)
        with self.assertLogs("distributed_shampoo.utils.shampoo_quantization", level="WARNING") as logs:
            qlist.quantize_()  # nothing stored: a warning, nothing else
            qlist.dequantize_()
            qlist.dequantize_()  # stored already: overwritten
            qlist.quantize((torch.ones(2, dtype=torch.float64),))  # not the stored values
        self.assertEqual(
            [record.msg for record in logs.records],
            [
                "No stored dequantized values self.dequantized_value_list=None. Must first call dequantize_().",
                "Dequantized values are already stored; overwriting these values...",
                "Existing stored dequantized values.\nWriting quantized values with input tensor_list without using "
                "these stored dequantized values...",
            ],
        )
        self.assertTrue(torch.equal(qlist.quantized_value[0], torch.ones(2, dtype=torch.float16)))

    def test_bad_input(self) -> None:
        with self.assertRaisesRegex(TypeError, r"^quantized_data must be .* but get <class 'list'>$"):
            QuantizedTensorList([torch.zeros(2)], torch.float32)  # pyre-ignore[6]: deliberately a bare tensor
        with self.assertRaisesRegex(AssertionError, r"computation_dtype=torch.int64 is not supported! It must be one of"):
            QuantizedTensorList([(torch.zeros(2), None, None)], torch.float32, torch.int64)
        with self.assertRaisesRegex(AssertionError, "quantized_dtype=torch.float16"):
            QuantizedTensorList([(torch.zeros(2), None, None)], torch.float16)
        integer = QuantizedTensorList([(torch.zeros(2, dtype=torch.int8), None, None)], torch.int8, torch.float32)
        with self.assertRaisesRegex(NotImplementedError, "Quantization for torch.int8 is not yet supported!"):
            integer.dequantize()
        with self.assertRaisesRegex(NotImplementedError, "Quantization for torch.int8 is not yet supported!"):
            integer.quantize((torch.zeros(2),))

    def test_the_type_error_names_the_annotation(self) -> None:
        with mock.patch.object(shampoo_quantization, "isinstance", side_effect=lambda obj, cls: False, create=True):
            with self.assertRaisesRegex(TypeError, r"Sequence\[tuple\[torch.Tensor, torch.Tensor \| None, torch.Tensor \| None\]\]"):
                QuantizedTensorList([(torch.zeros(2), None, None)], torch.float32)

    def test_empty_list(self) -> None:
        qlist = QuantizedTensorList([], torch.float16)
        with DequantizeQuantizedTensorListContext(qlist):
            self.assertEqual(qlist.dequantized_value, ())
        self.assertEqual(len(qlist), 0)
