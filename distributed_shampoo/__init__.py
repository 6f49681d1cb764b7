# pyre-strict
"""Distributed Shampoo: the optimizer, its utilities and a world-size independent checkpoint layer.

See ``docs/optimizer.md`` for the optimizer and ``docs/checkpoint.md`` for checkpoints.
"""

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.shampoo_types import (
    AdaGradPreconditionerConfig,
    AdamPreconditionerConfig,
    DDPDistributedConfig,
    FullyShardDistributedConfig,
    GraftingConfig,
    RMSpropPreconditionerConfig,
    SGDPreconditionerConfig,
)

__all__ = [
    "AdaGradPreconditionerConfig",
    "AdamPreconditionerConfig",
    "DDPDistributedConfig",
    "DistributedShampoo",
    "FullyShardDistributedConfig",
    "GraftingConfig",
    "RMSpropPreconditionerConfig",
    "SGDPreconditionerConfig",
]
