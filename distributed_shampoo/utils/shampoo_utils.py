# pyre-strict
"""Shape, splitting and load-balancing helpers used to cut parameters into Shampoo blocks."""

import heapq
import math
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate, compress, pairwise
from types import TracebackType
from typing import Generic, TypeVar

import torch

T = TypeVar("T")

# Buffers are aligned to this many bytes so that every rank's slice of a flat buffer starts aligned.
ALIGNMENT_BYTES = 64


def merge_small_dims(
    tensor_shape: Sequence[int],
    threshold: int | float,
    target_tensor_dimensionality: int | float = 1,
) -> tuple[int, ...]:
    """Reshapes a shape into fewer dimensions by merging adjacent small ones (the reference's rule).

    - A shape with a 0 gives ``(0,)``.
    - ``target_tensor_dimensionality=math.inf`` asks for no merging: the shape comes back as it is.
    - Otherwise size-1 dimensions are dropped (all ones gives ``(1,)``), and walking from the last
      dimension towards the first, a dimension is merged into the one after it while their product
      stays ``<= threshold`` and more than ``target_tensor_dimensionality`` dimensions would be
      left without the merge. ``threshold=math.inf`` merges down to the target.

    Examples (those of the reference's docstring): ``(1, 2, 5, 1)``, threshold 10, target 1 ->
    ``(10,)``; threshold 1 -> ``(2, 5)``; ``(32, 3, 64, 64)``, threshold 8192, target 1 ->
    ``(96, 4096)``; threshold 1,000,000, target 2 -> ``(32, 12288)``.

    Args:
        tensor_shape: The shape to merge.
        threshold: The largest size a merged dimension may have.
        target_tensor_dimensionality: Merging stops once this many dimensions would remain (an
            int, or ``math.inf`` for none).

    Returns:
        The merged shape; its product equals the product of ``tensor_shape``.

    Raises:
        ValueError: A float ``target_tensor_dimensionality`` other than ``math.inf``, or a negative
            dimension.
    """
    if any(dim < 0 for dim in tensor_shape):
        raise ValueError(f"merge_small_dims: negative dimension in {tuple(tensor_shape)}")
    if 0 in tensor_shape:
        return (0,)
    if isinstance(target_tensor_dimensionality, float):
        if target_tensor_dimensionality != math.inf:
            raise ValueError(f"{target_tensor_dimensionality=} has to be an integer or math.inf.")
        return tuple(tensor_shape)
    reversed_dims = [dim for dim in reversed(tensor_shape) if dim != 1] or [1]
    merged = [reversed_dims[0]]  # last dimension first
    for position, dim in enumerate(reversed_dims[1:], start=1):
        dims_without_merge = len(merged) + len(reversed_dims) - position
        if dims_without_merge > target_tensor_dimensionality and merged[-1] * dim <= threshold:
            merged[-1] *= dim
        else:
            merged.append(dim)
    return tuple(reversed(merged))


def multi_dim_split(tensor: torch.Tensor, split_size: int | float) -> tuple[torch.Tensor, ...]:
    """Splits a tensor along every dimension into blocks of at most ``split_size`` per dimension.

    Args:
        tensor: The tensor to split (any dimensionality; a 0-dim tensor is returned alone).
        split_size: The largest block length along each dimension; ``math.inf`` means no split.

    Returns:
        Views of ``tensor`` in row-major block order (the block index along dimension 0 varies
        slowest). As with ``torch.split``, a zero-size dimension counts as one (empty) block.

    Raises:
        ValueError: If ``split_size`` is not a positive integer or ``math.inf``.
    """
    if split_size == math.inf:
        return (tensor,)
    if not isinstance(split_size, int) or isinstance(split_size, bool) or split_size < 1:
        raise ValueError(f"multi_dim_split: split_size must be a positive int or math.inf, got {split_size!r}")
    blocks: tuple[torch.Tensor, ...] = (tensor,)
    for dim in range(tensor.dim()):
        blocks = tuple(piece for block in blocks for piece in torch.split(block, split_size, dim=dim))
    return blocks


def compress_list(complete_list: Sequence[T], selector: Sequence[bool]) -> tuple[T, ...]:
    """Returns the items of ``complete_list`` whose ``selector`` entry is true.

    Raises:
        AssertionError: If the two sequences differ in length (as the reference raises).
    """
    if len(complete_list) != len(selector):
        raise AssertionError(  # the reference's error type and message
            f"Inconsistent lengths between complete_list {len(complete_list)} and selector {len(selector)}!"
        )
    return tuple(compress(complete_list, selector))


def get_dtype_size(dtype: torch.dtype) -> int:
    """Returns the number of bytes of one element of ``dtype`` (``torch.bool`` is 1)."""
    return dtype.itemsize


def generate_pairwise_indices(input_list: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Yields ``(start, end)`` of consecutive partitions of the given sizes.

    Example: ``[2, 3, 1]`` yields ``(0, 2), (2, 5), (5, 6)``; an empty list yields nothing.
    """
    return pairwise(accumulate(input_list, initial=0))


def distribute_buffer_sizes(
    buffer_sizes: Sequence[int], group_size: int
) -> tuple[tuple[int, int], ...]:
    """Assigns buffers to ranks so that every rank holds about the same number of bytes.

    Each size is first aligned up to ``ALIGNMENT_BYTES`` (64). Buffers are then placed largest
    first (ties: lower input index first) onto the rank with the fewest bytes so far (ties: lower
    rank). The result depends only on the sizes and ``group_size``.

    Args:
        buffer_sizes: Sizes in bytes, each >= 0.
        group_size: The number of ranks, >= 1.

    Returns:
        ``(aligned_size, rank)`` for each buffer, in input order.

    Raises:
        ValueError: If ``group_size < 1`` or a size is negative.
    """
    if group_size < 1:
        raise ValueError(f"distribute_buffer_sizes: group_size must be >= 1, got {group_size}")
    if any(size < 0 for size in buffer_sizes):
        raise ValueError(f"distribute_buffer_sizes: negative buffer size in {tuple(buffer_sizes)}")
    aligned = [math.ceil(size / ALIGNMENT_BYTES) * ALIGNMENT_BYTES for size in buffer_sizes]
    ranks = [0] * len(aligned)
    loads = [(0, rank) for rank in range(group_size)]  # a heap of (bytes so far, rank)
    for index in sorted(range(len(aligned)), key=lambda i: (-aligned[i], i)):
        load, rank = heapq.heappop(loads)
        ranks[index] = rank
        heapq.heappush(loads, (load + aligned[index], rank))
    return tuple(zip(aligned, ranks))


class ParameterizeEnterExitContext(Generic[T]):
    """A context manager that calls one function on entry and another on exit.

    Args:
        input_with_enter_exit_context: The object both callers receive.
        enter_method_caller: Called with the object by ``__enter__``.
        exit_method_caller: Called with the object by ``__exit__``, also when the body raised.
    """

    def __init__(
        self,
        input_with_enter_exit_context: T,
        enter_method_caller: Callable[[T], None],
        exit_method_caller: Callable[[T], None],
    ) -> None:
        self._input = input_with_enter_exit_context
        self._enter = enter_method_caller
        self._exit = exit_method_caller

    def __enter__(self) -> T:
        self._enter(self._input)
        return self._input

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._exit(self._input)
