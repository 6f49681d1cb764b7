# pyre-strict
"""Distributed Shampoo: the optimizer, its utilities and a world-size independent checkpoint layer.

See ``docs/optimizer.md`` for the optimizer and ``docs/checkpoint.md`` for checkpoints.
"""

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.shampoo_types import (
    AdaGradGraftingConfig,
    AdaGradPreconditionerConfig,
    AdamGraftingConfig,
    AdamPreconditionerConfig,
    DDPDistributedConfig,
    FullyShardDistributedConfig,
    GraftingConfig,
    RMSpropGraftingConfig,
    RMSpropPreconditionerConfig,
    SGDGraftingConfig,
    SGDPreconditionerConfig,
)

__all__ = [
    "AdaGradGraftingConfig",
    "AdaGradPreconditionerConfig",
    "AdamGraftingConfig",
    "AdamPreconditionerConfig",
    "DDPDistributedConfig",
    "DistributedShampoo",
    "FullyShardDistributedConfig",
    "GraftingConfig",
    "RMSpropGraftingConfig",
    "RMSpropPreconditionerConfig",
    "SGDGraftingConfig",
    "SGDPreconditionerConfig",
]
