# pyre-strict
"""``BlockInfo``: where a Shampoo block comes from and how its state tensors are allocated."""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def _allocate_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class BlockInfo:
    """Describes one block of a parameter.

    Attributes:
        param: The parameter the block belongs to.
        composable_block_ids: ``(parameter index, "block_<i>")``, unique within the optimizer.
        allocate_zeros_tensor: Allocates the block's state tensors (e.g. inside a distributed
            buffer); defaults to ``torch.zeros``.
    """

    param: torch.Tensor
    composable_block_ids: tuple[int, str]
    allocate_zeros_tensor: Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = field(
        default=_allocate_zeros
    )
