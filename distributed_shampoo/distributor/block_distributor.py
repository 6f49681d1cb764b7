# pyre-strict
"""Block ownership and the all-gather of updates that keeps every rank's parameters identical.

``block_owners`` is the one definition of which rank owns which block: the optimizer, the
checkpoint tool's ``reshard`` (through ``checkpoint_writes``), the tests, the benchmarks and the
docs all call it.
"""

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distributed_shampoo.shampoo_types import DDPDistributedConfig
from distributed_shampoo.utils.shampoo_checkpoint_utils import decode_key, Key, param_key_path
from distributed_shampoo.utils.shampoo_utils import distribute_buffer_sizes


def block_owners(block_nbytes: Sequence[int], group_size: int) -> tuple[int, ...]:
    """The rank (within a group of ``group_size``) that owns each block, given the blocks' sizes
    in bytes in the optimizer's block order (``distribute_buffer_sizes``). A pure function of the
    block list and the group size, so every rank, and every tool, computes the same owners.

    Raises:
        ValueError: ``group_size < 1`` or a negative size.
    """
    return tuple(rank for _, rank in distribute_buffer_sizes(block_nbytes, group_size))


@dataclass(frozen=True)
class BlockSpec:
    """One block of one parameter; the list of all blocks is the same at every world size.

    Attributes:
        param_index: The parameter's position among all the optimizer's parameters.
        block_index: The block's position among its parameter's blocks (its ``block_<i>`` key).
        shape: The block's shape.
        nbytes: The block's size in the parameter's dtype, which is what ownership balances.
    """

    param_index: int
    block_index: int
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


class BlockDistributor:
    """Assigns blocks to ranks and all-gathers the updates their owners compute.

    Without a config this process owns every block and nothing is communicated. With a
    ``DDPDistributedConfig``, the blocks are assigned within each group of
    ``num_trainers_per_group`` ranks by ``distribute_buffer_sizes`` on their byte sizes, so the
    assignment depends only on the block list and the group size.

    Args:
        blocks: Every block of every parameter, in a fixed order.
        config: The distribution, or None for a single process.
        device: Where the communication buffers live (the parameters' device).

    Raises:
        RuntimeError: A config is given but ``torch.distributed`` is not initialised.
        ValueError: The world size is not a multiple of ``num_trainers_per_group``.
    """

    def __init__(
        self, blocks: Sequence[BlockSpec], config: DDPDistributedConfig | None, device: torch.device
    ) -> None:
        self._blocks: tuple[BlockSpec, ...] = tuple(blocks)
        self._group: dist.ProcessGroup | None = None
        self.group_rank: int = 0
        self.group_size: int = 1
        if config is not None:
            if not dist.is_initialized():
                raise RuntimeError("DDPDistributedConfig needs torch.distributed to be initialised first")
            world_size = dist.get_world_size()
            group_size = world_size if config.num_trainers_per_group == -1 else config.num_trainers_per_group
            if world_size % group_size != 0:
                raise ValueError(
                    f"DDPDistributedConfig: num_trainers_per_group={group_size} does not divide the "
                    f"world size {world_size}"
                )
            if group_size < world_size:
                self._group, _ = dist.new_subgroups(group_size=group_size)
            self.group_size, self.group_rank = group_size, dist.get_rank(self._group)
        self.owners: tuple[int, ...] = block_owners([block.nbytes for block in blocks], self.group_size)
        # Each rank packs its blocks' updates one after the other into a buffer as long as the
        # largest rank's; the all-gather returns every rank's buffer.
        self._offsets: list[int] = [0] * len(self._blocks)
        per_rank_numel = [0] * self.group_size
        for index, (block, owner) in enumerate(zip(self._blocks, self.owners)):
            self._offsets[index] = per_rank_numel[owner]
            per_rank_numel[owner] += block.numel
        buffer_numel = max(per_rank_numel)
        dtype = config.communication_dtype if config is not None else torch.float32
        self._send: torch.Tensor = torch.zeros(buffer_numel, dtype=dtype, device=device)
        self._gathered: list[torch.Tensor] = [torch.zeros_like(self._send) for _ in range(self.group_size)]

    def is_owned(self, block_position: int) -> bool:
        """Whether this rank computes the block at ``block_position`` in the block list."""
        return self.owners[block_position] == self.group_rank

    def exchange(self, directions: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Shares the owners' updates so that every rank holds every block's update.

        Args:
            directions: One entry per block: this rank's update for the blocks it owns and that
                have one, None otherwise.

        Returns:
            Every block's update, as its owner computed it (rounded to the communication dtype
            when distributed); None where the owner had none (single process only: distributed,
            such a block comes back as zeros).
        """
        if self.group_size == 1:
            return list(directions)
        for position, direction in enumerate(directions):
            if self.is_owned(position):
                start, end = self._offsets[position], self._offsets[position] + self._blocks[position].numel
                if direction is None:
                    self._send[start:end].zero_()
                else:
                    self._send[start:end].copy_(direction.reshape(-1))
        dist.all_gather(self._gathered, self._send, group=self._group)
        return [
            self._gathered[owner][offset : offset + block.numel].view(block.shape)
            for block, owner, offset in zip(self._blocks, self.owners, self._offsets)
        ]


_BLOCK_KEY: re.Pattern[str] = re.compile(r"block_(\d+)")
# The block-shaped buffers of a block's state, whose size is the block's size in the parameter dtype.
_PARAM_SHAPED: tuple[str, ...] = ("filtered_grad", "momentum", "adagrad")


def checkpoint_writes(
    tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]], world_size: int, param_dtype: torch.dtype = torch.float32
) -> list[list[str]]:
    """Which rank writes which tensor of a ``DistributedShampoo`` state saved at ``world_size``
    ranks (``DDPDistributedConfig()``): each block's tensors go to the block's owner, everything
    else to rank 0.

    Blocks are the keys ``[..., "state", <param>, "block_<i>", ...]``, ordered as the optimizer
    orders them (parameters in the order they appear, then block index); a block's size is that
    of its parameter-shaped buffer, or the product of its factor matrices' sizes times the size
    of ``param_dtype``.

    Args:
        tensors: Logical tensor name (a JSON-list key path) -> (shape, dtype), e.g. a checkpoint
            index's layouts.
        world_size: The number of ranks to write for.
        param_dtype: The parameters' dtype, for blocks without a parameter-shaped buffer.

    Returns:
        Per rank, the names it writes; every name appears once.

    Raises:
        ValueError: ``world_size < 1``, or there are no Shampoo blocks.
    """
    blocks: dict[tuple[tuple[Key, ...], int], list[str]] = {}
    param_order: dict[tuple[Key, ...], int] = {}
    for name in tensors:
        path = decode_key(name)
        param = param_key_path(path)
        if param is None or len(path) == len(param):
            continue
        param_order.setdefault(param, len(param_order))
        match = _BLOCK_KEY.fullmatch(str(path[len(param)]))
        if match is not None:
            blocks.setdefault((param, int(match.group(1))), []).append(name)
    if not blocks:
        raise ValueError('no Shampoo blocks (keys [..., "state", <param>, "block_<i>", ...]) to distribute')
    ordered = sorted(blocks, key=lambda block: (param_order[block[0]], block[1]))
    sizes = [_block_nbytes(tensors, blocks[block], param_dtype) for block in ordered]
    writes: list[list[str]] = [[] for _ in range(world_size)]
    in_blocks: set[str] = set()
    for block, owner in zip(ordered, block_owners(sizes, world_size)):
        writes[owner].extend(blocks[block])
        in_blocks.update(blocks[block])
    writes[0][:0] = [name for name in tensors if name not in in_blocks]
    return writes


def _block_nbytes(tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]], names: list[str], param_dtype: torch.dtype) -> int:
    factor_sizes: dict[int, int] = {}
    for name in names:
        path = decode_key(name)
        shape, dtype = tensors[name]
        if path[-1] in _PARAM_SHAPED:
            return math.prod(shape) * dtype.itemsize
        dim = path[-1]
        if len(path) >= 2 and path[-2] == "factor_matrices" and isinstance(dim, int):
            factor_sizes[dim] = shape[0]
    return math.prod(factor_sizes.values()) * param_dtype.itemsize
