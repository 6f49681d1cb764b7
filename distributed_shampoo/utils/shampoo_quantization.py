# pyre-strict
"""Low-precision storage of optimizer state with a higher-precision computation dtype.

The contract is the reference's (facebookresearch/optimizers at ``18178f4``): storage in a float
dtype is a plain cast; integer storage (with min/max values) is declared but not implemented, and
raises ``NotImplementedError``.
"""

import logging
import typing
from collections.abc import Sequence

import torch

from distributed_shampoo.distributor.shampoo_block_info import BlockInfo
from distributed_shampoo.utils.optimizer_modules import OptimizerModule
from distributed_shampoo.utils.shampoo_utils import compress_list, ParameterizeEnterExitContext

logger: logging.Logger = logging.getLogger(__name__)

_FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _not_supported(dtype: torch.dtype) -> NotImplementedError:
    return NotImplementedError(f"Quantization for {dtype} is not yet supported!")


class QuantizedTensor(OptimizerModule):
    """A tensor stored in a (possibly lower-precision) dtype, with the metadata integer storage
    would need.

    Args:
        quantized_values: The stored tensor.
        block_info: The block it belongs to (allocates and unwraps its tensors).
        min_value, max_value: Integer storage's range; None for float storage. For integer
            storage without them the values must be all zero, and the range becomes ``[0, 0]``.

    Raises:
        ValueError: A float storage given a range, or a nonzero integer storage without one.
    """

    def __init__(
        self,
        quantized_values: torch.Tensor,
        block_info: BlockInfo,
        min_value: torch.Tensor | None = None,
        max_value: torch.Tensor | None = None,
    ) -> None:
        self.quantized_values = quantized_values
        self.min_value = min_value
        self.max_value = max_value
        self.block_info = block_info
        if quantized_values.dtype in _FLOAT_DTYPES:
            if min_value is not None or max_value is not None:
                raise ValueError(f"QuantizedTensor: float storage ({quantized_values.dtype}) takes no min/max values")
        elif min_value is None and max_value is None:
            if torch.count_nonzero(quantized_values) != 0:
                raise ValueError("QuantizedTensor: integer storage with values needs its min/max values")
            self.min_value, self.max_value = torch.zeros(1), torch.zeros(1)

    @classmethod
    def init_from_dequantized_tensor(
        cls, dequantized_values: torch.Tensor, quantized_dtype: torch.dtype, block_info: BlockInfo
    ) -> "QuantizedTensor":
        """Allocates storage of ``quantized_dtype`` through ``block_info`` and stores
        ``dequantized_values`` in it.

        Raises:
            NotImplementedError: ``quantized_dtype`` is not a float dtype.
        """
        if quantized_dtype not in _FLOAT_DTYPES:
            raise _not_supported(quantized_dtype)
        storage = block_info.allocate_zeros_tensor(
            size=dequantized_values.shape, dtype=quantized_dtype, device=dequantized_values.device
        )
        block_info.get_tensor(storage).copy_(block_info.get_tensor(dequantized_values))
        return cls(storage, block_info)

    def dequantize(self, dequantized_dtype: torch.dtype) -> torch.Tensor:
        """The values in ``dequantized_dtype``: the stored tensor itself when the dtypes are equal,
        else a new tensor.

        Raises:
            NotImplementedError: Integer storage.
        """
        stored = self.quantized_values
        if stored.dtype == dequantized_dtype:
            return stored
        if stored.dtype not in _FLOAT_DTYPES:
            raise _not_supported(stored.dtype)
        return stored.to(dtype=dequantized_dtype, copy=True)

    def quantize(self, dequantized_tensor: torch.Tensor) -> None:
        """Stores ``dequantized_tensor`` (rounded to the storage dtype) in place.

        Raises:
            NotImplementedError: Integer storage.
        """
        if self.quantized_values.dtype not in _FLOAT_DTYPES:
            raise _not_supported(self.quantized_values.dtype)
        self.quantized_values.copy_(dequantized_tensor)
        self.min_value = self.max_value = None


class QuantizedTensorList:
    """A list of tensors stored in ``quantized_dtype`` and computed on in ``computation_dtype``.

    ``dequantize_()`` materialises ``dequantized_value`` (copies in the computation dtype; the
    stored tensors themselves when both dtypes are equal); compute on it in place, then
    ``quantize_()`` rounds the results back into storage and frees the copies.

    Args:
        quantized_data: ``(tensor, min, max)`` tuples, or ``QuantizedTensor``s (their local
            tensors are used, not copied).
        quantized_dtype: The dtype of every stored tensor.
        computation_dtype: A float dtype (``_FLOAT_DTYPES``).

    Raises:
        TypeError: ``quantized_data`` is neither kind of sequence.
        AssertionError: A stored tensor of another dtype, an unsupported computation dtype, or
            min/max values given for some entries only (the reference's errors).
    """

    def __init__(
        self,
        quantized_data: Sequence[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] | Sequence[QuantizedTensor],
        quantized_dtype: torch.dtype,
        computation_dtype: torch.dtype = torch.float32,
    ) -> None:
        if all(isinstance(entry, QuantizedTensor) for entry in quantized_data):
            entries = [
                (entry.block_info.get_tensor(entry.quantized_values), entry.min_value, entry.max_value)
                for entry in typing.cast(Sequence[QuantizedTensor], quantized_data)
            ]
        elif all(isinstance(entry, tuple) for entry in quantized_data):
            entries = list(typing.cast(Sequence[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]], quantized_data))
        else:
            hint = typing.get_type_hints(QuantizedTensorList.__init__)["quantized_data"]
            raise TypeError(f"quantized_data must be {hint} but get {type(quantized_data)}")
        self.quantized_value_list: tuple[torch.Tensor, ...] = tuple(entry[0] for entry in entries)
        self._min_values: tuple[torch.Tensor | None, ...] = tuple(entry[1] for entry in entries)
        self._max_values: tuple[torch.Tensor | None, ...] = tuple(entry[2] for entry in entries)
        self.dequantized_value_list: tuple[torch.Tensor, ...] | None = None
        if any(value.dtype != quantized_dtype for value in self.quantized_value_list):
            raise AssertionError(f"every stored tensor must be of quantized_dtype={quantized_dtype}")
        if computation_dtype not in _FLOAT_DTYPES:
            raise AssertionError(f"{computation_dtype=} is not supported! It must be one of {_FLOAT_DTYPES}!")
        ranges = {(low is None, high is None) for low, high in zip(self._min_values, self._max_values)}
        if len(ranges) > 1 or (True, False) in ranges or (False, True) in ranges:
            raise AssertionError("min/max values must be given for every entry or for none")
        self.quantized_dtype = quantized_dtype
        self.computation_dtype = computation_dtype

    def __len__(self) -> int:
        return len(self.quantized_value_list)

    def dequantize(self) -> tuple[torch.Tensor, ...]:
        """The values in ``computation_dtype``: the stored tensors themselves when the dtypes are
        equal, else new tensors.

        Raises:
            NotImplementedError: Integer storage.
        """
        if self.quantized_dtype == self.computation_dtype:
            return self.quantized_value_list
        if self.quantized_dtype not in _FLOAT_DTYPES:
            raise _not_supported(self.quantized_dtype)
        return tuple(value.to(dtype=self.computation_dtype, copy=True) for value in self.quantized_value_list)

    def dequantize_(self) -> None:
        """Stores ``dequantize()`` as ``dequantized_value`` (a warning if one is stored already:
        it is overwritten)."""
        if self.is_dequantized_stored():
            logger.warning("Dequantized values are already stored; overwriting these values...")
        self.dequantized_value_list = self.dequantize()

    def quantize(self, tensor_list: Sequence[torch.Tensor]) -> None:
        """Stores ``tensor_list`` (rounded to ``quantized_dtype``) in place.

        Raises:
            NotImplementedError: Integer storage.
        """
        if tensor_list is not self.dequantized_value_list and self.is_dequantized_stored():
            logger.warning(
                "Existing stored dequantized values.\nWriting quantized values with input tensor_list without "
                "using these stored dequantized values..."
            )
        if self.quantized_dtype not in _FLOAT_DTYPES:
            raise _not_supported(self.quantized_dtype)
        for stored, value in zip(self.quantized_value_list, tensor_list, strict=True):
            if stored is not value:
                stored.copy_(value)

    def quantize_(self) -> None:
        """Rounds ``dequantized_value`` back into storage and frees it (a warning, and nothing
        else, if nothing is stored)."""
        if not self.is_dequantized_stored():
            logger.warning(f"No stored dequantized values {self.dequantized_value_list=}. Must first call dequantize_().")
            return
        dequantized = self.dequantized_value_list
        if dequantized is not None and self.quantized_dtype != self.computation_dtype:
            self.quantize(dequantized)
        self.dequantized_value_list = None

    @property
    def dequantized_value(self) -> tuple[torch.Tensor, ...]:
        """The stored dequantized values (after ``dequantize_()``).

        Raises:
            AssertionError: None are stored.
        """
        if self.dequantized_value_list is None:
            raise AssertionError("no dequantized values are stored; call dequantize_() first")
        return self.dequantized_value_list

    @property
    def quantized_value(self) -> tuple[torch.Tensor, ...]:
        """The stored tensors, in ``quantized_dtype``."""
        return self.quantized_value_list

    def is_dequantized_stored(self) -> bool:
        return self.dequantized_value_list is not None

    def compress(self, selector: Sequence[bool]) -> "QuantizedTensorList":
        """The selected entries, sharing this list's storage (no copies).

        Raises:
            AssertionError: Dequantized values are stored, or ``selector`` has another length.
        """
        if self.is_dequantized_stored():
            raise AssertionError("compress() needs the dequantized values quantized first")
        return QuantizedTensorList(
            list(
                zip(
                    compress_list(self.quantized_value_list, selector),
                    compress_list(self._min_values, selector),
                    compress_list(self._max_values, selector),
                    strict=True,
                )
            ),
            self.quantized_dtype,
            self.computation_dtype,
        )


class DequantizeQuantizedTensorListContext(ParameterizeEnterExitContext[QuantizedTensorList]):
    """Dequantizes a ``QuantizedTensorList`` on entry and quantizes it back on exit."""

    def __init__(self, quantized_tensor_list: QuantizedTensorList) -> None:
        super().__init__(quantized_tensor_list, QuantizedTensorList.dequantize_, QuantizedTensorList.quantize_)
