# pyre-strict
"""The README's main job: shows how Shampoo blocks are cut and assigned to ranks."""

import math

import torch

from distributed_shampoo.utils.shampoo_checkpoint_utils import flatten
from distributed_shampoo.utils.shampoo_utils import distribute_buffer_sizes, merge_small_dims, multi_dim_split


def main() -> None:
    shapes = {"conv.weight": (64, 3, 7, 7), "fc.weight": (1000, 512), "fc.bias": (1000,)}
    max_preconditioner_dim = 256
    blocks: dict[str, tuple[torch.Tensor, ...]] = {}
    print(f"Blocks with max_preconditioner_dim={max_preconditioner_dim} (independent of the world size):")
    for name, shape in shapes.items():
        merged = merge_small_dims(shape, max_preconditioner_dim)
        blocks[name] = multi_dim_split(torch.zeros(merged), max_preconditioner_dim)
        print(f"  {name:12s} {str(shape):16s} -> merged {str(merged):12s} -> {len(blocks[name])} blocks")
    sizes = [b.numel() * 4 for bs in blocks.values() for b in bs]
    for world_size in (4, 2, 3):
        loads = [0] * world_size
        for size, rank in distribute_buffer_sizes(sizes, world_size):
            loads[rank] += size
        print(f"  world size {world_size}: bytes per rank {loads} (imbalance {max(loads) / (sum(loads) / world_size):.2f}x)")
    keys = list(flatten({"state": {name: {f"block_{i}": 0 for i in range(len(bs))} for name, bs in blocks.items()}}))
    print(f"Checkpoint keys look like {keys[0]} ... {keys[-1]} ({len(keys)} keys, max {math.prod((1000, 512))} elements)")


if __name__ == "__main__":
    main()
