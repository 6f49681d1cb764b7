# pyre-strict
"""``BlockInfo``: where a Shampoo block comes from and how its state tensors are allocated
(at the reference's path, ``distributed_shampoo/distributor/shampoo_block_info.py``)."""

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class BlockInfo:
    """Describes one block of a parameter.

    Attributes:
        param: The parameter the block belongs to.
        composable_block_ids: ``(parameter index, "block_<i>")``, unique within the optimizer.
        allocate_zeros_tensor: Allocates the block's state tensors, called as
            ``(size=..., dtype=..., device=...)`` (e.g. inside a distributed buffer); defaults to
            ``torch.zeros``.
        allocate_ones_tensor: ``torch.ones`` (not settable, as in the reference).
        allocate_eye_tensor: ``torch.eye`` (not settable).
        get_tensor: The local tensor of an allocated one (the identity here; not settable).
    """

    param: torch.Tensor
    composable_block_ids: tuple[int, str]
    allocate_zeros_tensor: Callable[..., torch.Tensor] = field(default=partial(torch.zeros))
    # Factories, so that the functions become instance attributes rather than methods.
    allocate_ones_tensor: Callable[..., torch.Tensor] = field(init=False, default_factory=lambda: torch.ones)
    allocate_eye_tensor: Callable[..., torch.Tensor] = field(init=False, default_factory=lambda: torch.eye)
    get_tensor: Callable[[torch.Tensor], torch.Tensor] = field(init=False, default_factory=lambda: _identity)
