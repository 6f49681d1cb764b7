# pyre-strict
"""Low-precision storage of optimizer state with a higher-precision computation dtype."""

from collections.abc import Sequence

import torch

from distributed_shampoo.utils.shampoo_block_info import BlockInfo
from distributed_shampoo.utils.shampoo_utils import compress_list, ParameterizeEnterExitContext

# The storage dtypes supported: plain casts, no scales or offsets.
QUANTIZED_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)

# One entry of ``QuantizedTensorList``'s input: a tensor, or ``(tensor, min, max)`` as the
# reference API takes it; min/max belong to integer quantization, which is not supported.
QuantizedData = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def _check_quantized_dtype(dtype: torch.dtype) -> None:
    if dtype not in QUANTIZED_DTYPES:
        raise ValueError(f"quantized dtype must be one of {QUANTIZED_DTYPES}, got {dtype}")


def _check_computation_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise ValueError(f"computation dtype must be a floating point dtype, got {dtype}")


class QuantizedTensor:
    """A tensor stored in ``quantized_values.dtype`` (one of ``QUANTIZED_DTYPES``)."""

    def __init__(self, quantized_values: torch.Tensor, block_info: BlockInfo | None = None) -> None:
        _check_quantized_dtype(quantized_values.dtype)
        self.quantized_values = quantized_values
        self.block_info = block_info

    @classmethod
    def init_from_dequantized_tensor(
        cls,
        dequantized_values: torch.Tensor,
        quantized_dtype: torch.dtype,
        block_info: BlockInfo | None = None,
    ) -> "QuantizedTensor":
        """Allocates storage of ``quantized_dtype`` (through ``block_info`` when given) and
        fills it with ``dequantized_values`` rounded to that dtype.

        Raises:
            ValueError: If ``quantized_dtype`` is not supported.
        """
        _check_quantized_dtype(quantized_dtype)
        shape = tuple(dequantized_values.shape)
        device = dequantized_values.device
        storage = (
            block_info.allocate_zeros_tensor(shape, quantized_dtype, device)
            if block_info is not None
            else torch.empty(shape, dtype=quantized_dtype, device=device)
        )
        storage.copy_(dequantized_values)
        return cls(storage, block_info)

    def dequantize(self, dequantized_dtype: torch.dtype) -> torch.Tensor:
        """Returns a new tensor of ``dequantized_dtype`` with the stored values."""
        _check_computation_dtype(dequantized_dtype)
        return self.quantized_values.to(dtype=dequantized_dtype, copy=True)

    def quantize_(self, dequantized_values: torch.Tensor) -> None:
        """Stores ``dequantized_values`` (rounded) into the existing storage, in place.

        Raises:
            ValueError: If the shape differs from the stored tensor's.
        """
        if dequantized_values.shape != self.quantized_values.shape:
            raise ValueError(
                f"quantize_: shape {tuple(dequantized_values.shape)} does not match "
                f"{tuple(self.quantized_values.shape)}"
            )
        self.quantized_values.copy_(dequantized_values)


class QuantizedTensorList:
    """A list of tensors stored in ``quantized_dtype`` and computed on in ``computation_dtype``.

    Call ``dequantize_()`` to materialise ``dequantized_value`` (copies in the computation dtype;
    the stored tensors themselves when both dtypes are equal), compute on it in place, then
    ``quantize_()`` to round the results back into storage and free the copies.

    Args:
        quantized_data: Tensors, or ``(tensor, None, None)`` tuples as the reference API takes.
            A tensor already of ``quantized_dtype`` is kept as is (no copy); others are converted.
        quantized_dtype: The storage dtype, one of ``QUANTIZED_DTYPES``.
        computation_dtype: A floating point dtype.

    Raises:
        ValueError: For an unsupported dtype, or a tuple with min/max values (integer quantization
            is not supported).
    """

    def __init__(
        self,
        quantized_data: Sequence[QuantizedData],
        quantized_dtype: torch.dtype,
        computation_dtype: torch.dtype = torch.float32,
    ) -> None:
        _check_quantized_dtype(quantized_dtype)
        _check_computation_dtype(computation_dtype)
        self.quantized_dtype = quantized_dtype
        self.computation_dtype = computation_dtype
        self._quantized: tuple[torch.Tensor, ...] = tuple(
            _as_tensor(entry).to(dtype=quantized_dtype) for entry in quantized_data
        )
        self._dequantized: tuple[torch.Tensor, ...] | None = None

    def __len__(self) -> int:
        return len(self._quantized)

    @property
    def quantized_value(self) -> tuple[torch.Tensor, ...]:
        """The stored tensors, in ``quantized_dtype``."""
        return self._quantized

    @property
    def dequantized_value(self) -> tuple[torch.Tensor, ...]:
        """The tensors in ``computation_dtype``; valid between ``dequantize_`` and ``quantize_``.

        Raises:
            RuntimeError: If ``dequantize_()`` has not been called.
        """
        if self._dequantized is None:
            raise RuntimeError("dequantized_value is only available after dequantize_()")
        return self._dequantized

    def is_dequantized_stored(self) -> bool:
        """True between ``dequantize_()`` and ``quantize_()``."""
        return self._dequantized is not None

    def dequantize(self) -> tuple[torch.Tensor, ...]:
        """Returns new tensors of ``computation_dtype`` with the stored values."""
        return tuple(t.to(dtype=self.computation_dtype, copy=True) for t in self._quantized)

    def dequantize_(self) -> None:
        """Materialises ``dequantized_value``. Calling it again keeps the current values."""
        if self._dequantized is not None:
            return
        self._dequantized = (
            self._quantized
            if self.computation_dtype == self.quantized_dtype
            else self.dequantize()
        )

    def quantize_(self) -> None:
        """Rounds ``dequantized_value`` back into storage and frees it. No-op if not dequantized."""
        dequantized = self._dequantized
        if dequantized is None:
            return
        for stored, computed in zip(self._quantized, dequantized):
            if stored is not computed:
                stored.copy_(computed)
        self._dequantized = None

    def compress(self, selector: Sequence[bool]) -> "QuantizedTensorList":
        """Returns a list of the selected entries sharing this list's storage (no copies).

        Raises:
            ValueError: If ``selector``'s length differs from the list's.
        """
        compressed = QuantizedTensorList(
            compress_list(self._quantized, selector), self.quantized_dtype, self.computation_dtype
        )
        if self._dequantized is not None:
            compressed._dequantized = compress_list(self._dequantized, selector)
        return compressed


def _as_tensor(entry: QuantizedData) -> torch.Tensor:
    if isinstance(entry, torch.Tensor):
        return entry
    tensor, min_values, max_values = entry
    if min_values is not None or max_values is not None:
        raise ValueError(
            "QuantizedTensorList: min/max values (integer quantization) are not supported; "
            "pass (tensor, None, None) or the tensor alone"
        )
    return tensor


class DequantizeQuantizedTensorListContext(ParameterizeEnterExitContext[QuantizedTensorList]):
    """Dequantizes a ``QuantizedTensorList`` on entry and quantizes it back on exit."""

    def __init__(self, quantized_tensor_list: QuantizedTensorList) -> None:
        super().__init__(quantized_tensor_list, QuantizedTensorList.dequantize_, QuantizedTensorList.quantize_)
