# pyre-strict
"""How parameters are cut into Shampoo blocks.

A function of each parameter's global shape, ``max_preconditioner_dim`` and the distributed
config's ``target_parameter_dimensionality`` only (never of the world size), so the block
list is the same at every world size and under every distribution (one process, DDP, FSDP2):
that is what makes the optimizer's state reshardable.
"""

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distributed_shampoo.utils.shampoo_utils import merge_small_dims, multi_dim_split


@dataclass(frozen=True)
class BlockSpec:
    """One block of one parameter; the list of all blocks is the same at every world size.

    Attributes:
        param_index: The parameter's position among all the optimizer's parameters.
        block_index: The block's position among its parameter's blocks (its ``block_<i>`` key).
        shape: The block's shape.
    """

    param_index: int
    block_index: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter is cut: its merged shape, the split size, and its blocks' positions.

    Attributes:
        merged_shape: ``merge_small_dims(global shape, max_preconditioner_dim, target
            dimensionality)``.
        max_preconditioner_dim: The split size of every merged dimension (``math.inf``: none).
        block_positions: The positions of the parameter's blocks in the optimizer's block list.
    """

    merged_shape: tuple[int, ...]
    max_preconditioner_dim: int | float
    block_positions: range

    def split(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views of ``tensor`` (the whole parameter or its gradient) in block order."""
        return multi_dim_split(tensor.view(self.merged_shape), self.max_preconditioner_dim)

    @property
    def row_numel(self) -> int:
        """Elements per row of dimension 0 of the merged shape."""
        return math.prod(self.merged_shape[1:])

    def block_boxes(self) -> tuple[tuple[range, ...], ...]:
        """Each block's index ranges in the merged shape, in block order (see ``block_boxes``)."""
        return block_boxes(self.merged_shape, self.max_preconditioner_dim)


def block_boxes(merged_shape: tuple[int, ...], max_preconditioner_dim: int | float) -> tuple[tuple[range, ...], ...]:
    """The index ranges of each block ``multi_dim_split(tensor, max_preconditioner_dim)`` cuts
    from a tensor of ``merged_shape``, in its order (dimension 0's block index varies slowest).

    Along a dimension of length 0, the one (empty) block has the range ``range(0, 0)``, as
    ``torch.split`` gives one empty piece.
    """
    per_dim = [
        [range(start, min(start + size, length)) for start in range(0, length, size)] or [range(0, 0)]
        for length, size in ((length, _block_size(length, max_preconditioner_dim)) for length in merged_shape)
    ]
    return tuple(itertools.product(*per_dim))


def _block_size(length: int, max_preconditioner_dim: int | float) -> int:
    """The block length along a dimension of ``length`` (``math.inf``: the whole dimension)."""
    return int(max_preconditioner_dim) if max_preconditioner_dim != math.inf else max(length, 1)


def param_layouts(
    shapes: Sequence[tuple[int, ...]],
    max_preconditioner_dims: Sequence[int | float],
    target_parameter_dimensionality: int | float = 1,
) -> tuple[list[ParamLayout], list[BlockSpec]]:
    """Cuts every parameter into blocks.

    Args:
        shapes: Each parameter's global shape, in the optimizer's order.
        max_preconditioner_dims: Each parameter's (its group's) ``max_preconditioner_dim``.
        target_parameter_dimensionality: How many dimensions merging keeps (``merge_small_dims``).

    Returns:
        Each parameter's layout, and every block of every parameter in block order.
    """
    layouts: list[ParamLayout] = []
    blocks: list[BlockSpec] = []
    for param_index, (shape, max_dim) in enumerate(zip(shapes, max_preconditioner_dims)):
        merged = merge_small_dims(shape, max_dim, target_parameter_dimensionality)
        first = len(blocks)
        for block_index, box in enumerate(block_boxes(merged, max_dim)):
            blocks.append(BlockSpec(param_index, block_index, tuple(len(axis) for axis in box)))
        layouts.append(ParamLayout(merged, max_dim, range(first, len(blocks))))
    return layouts, blocks
