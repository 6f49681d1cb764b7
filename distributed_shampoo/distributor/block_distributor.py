# pyre-strict
"""Block ownership, the distributor interface, and DDP's all-gather of updates.

``block_owners`` is the one definition of which rank owns which block: the optimizer, the
checkpoint tool's ``reshard`` (through ``checkpoint_writes``), the tests, the benchmarks and the
docs all call it.
"""

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from distributed_shampoo.distributor.block_layout import BlockSpec, ParamLayout
from distributed_shampoo.shampoo_types import DDPDistributedConfig
from distributed_shampoo.utils.shampoo_checkpoint_utils import decode_key, Key, param_key_path
from distributed_shampoo.utils.shampoo_utils import distribute_buffer_sizes


def block_owners(block_nbytes: Sequence[int], group_size: int) -> tuple[int, ...]:
    """The rank (within a group of ``group_size``) that owns each block, given the bytes of each
    block's optimizer state in the optimizer's block order (``distribute_buffer_sizes``).

    Balancing the state's bytes, not the blocks' elements, is what evens out memory: a 1-D
    block's factor matrix is far larger than the block. A pure function of the blocks' state
    sizes and the group size, so every rank, and every tool (``checkpoint_writes`` reads the
    sizes from a checkpoint's index), computes the same owners.

    Raises:
        ValueError: ``group_size < 1`` or a negative size.
    """
    return tuple(rank for _, rank in distribute_buffer_sizes(block_nbytes, group_size))


class BlockDistributor(ABC):
    """Which rank owns each block, how an owner gets its blocks' gradients, and how the updates
    it computes reach every rank that holds the parameter.

    The optimizer's step is: ``agree_on_gradients``, then ``block_inputs`` for the owned blocks,
    then the per-block math on the owner, then ``apply_updates`` (by default through
    ``block_updates``). Ownership is
    ``block_owners`` over the whole block list and the group size, so it depends only on the
    blocks and the number of ranks sharing one copy of the state.

    Args:
        blocks: Every block of every parameter, in block order.
        layouts: Each parameter's layout.
        state_nbytes: The bytes of each block's optimizer state.
        group_size: The ranks that share one copy of the optimizer state.
        group_rank: This rank's position among them.
    """

    def __init__(
        self,
        blocks: Sequence[BlockSpec],
        layouts: Sequence[ParamLayout],
        state_nbytes: Sequence[int],
        group_size: int,
        group_rank: int,
    ) -> None:
        self._blocks: tuple[BlockSpec, ...] = tuple(blocks)
        self._layouts: tuple[ParamLayout, ...] = tuple(layouts)
        self.group_size: int = group_size
        self.group_rank: int = group_rank
        self.owners: tuple[int, ...] = block_owners(state_nbytes, group_size)
        # What this rank sent to and received from other ranks so far, for benchmarks.
        self.bytes_sent: int = 0
        self.bytes_received: int = 0

    def is_owned(self, block_position: int) -> bool:
        """Whether this rank computes the block at ``block_position`` in the block list."""
        return self.owners[block_position] == self.group_rank

    def agree_on_gradients(self, has_gradient: Sequence[bool]) -> None:
        """Checks that every rank steps the same parameters (nothing to check by default).

        Raises:
            RuntimeError: The ranks disagree on which parameters have a gradient.
        """

    @abstractmethod
    def block_inputs(self, tensors: Sequence[tuple[torch.Tensor, ...] | None]) -> dict[int, tuple[torch.Tensor, ...]]:
        """The owned blocks of the given tensors.

        Args:
            tensors: Per parameter, this rank's (local) tensors to cut into blocks, e.g. the
                gradient and the parameter, the same number on every rank; None to skip the
                parameter.

        Returns:
            For each block this rank owns of a parameter not skipped, one block-shaped tensor
            per given tensor, in memory of its own with row-major strides: matrix products round
            differently for differently strided (even along dimensions of size 1) or aligned
            operands, and the trajectory must not depend on how the blocks reached their owner.
        """

    @abstractmethod
    def block_updates(
        self, params: Sequence[torch.Tensor], directions: Mapping[int, torch.Tensor], stepped: Sequence[bool]
    ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Shares the owners' updates with the ranks that hold the parameters.

        Args:
            params: Every parameter's local tensor on this rank.
            directions: The update of each block this rank owns of a stepped parameter.
            stepped: Per parameter, whether it is stepped (the same on every rank).

        Returns:
            ``(parameter index, target, update)`` for every region of a stepped parameter this
            rank holds: ``target`` is a view of the local parameter, ``update`` its owner's
            update for it, of the same shape (rounded to the communication dtype, if any).
        """


    def apply_updates(
        self, params: Sequence[torch.Tensor], directions: Mapping[int, torch.Tensor], stepped: Sequence[bool], lrs: Sequence[float]
    ) -> None:
        """``W -= lr * D`` for every stepped parameter this rank holds, from its blocks' owners'
        directions (``block_updates``).

        Args:
            params: Every parameter's local tensor on this rank.
            directions: The direction of each block this rank owns of a stepped parameter.
            stepped: Per parameter, whether it is stepped (the same on every rank).
            lrs: Per parameter, its group's learning rate.
        """
        for param_index, target, update in self.block_updates(params, directions, stepped):
            target.add_(update.to(target.dtype), alpha=-lrs[param_index])


class DDPDistributor(BlockDistributor):
    """Every rank holds whole parameters; blocks are owned within groups of ranks and the updates
    their owners compute are all-gathered within the group.

    Without a config this process owns every block and nothing is communicated. With a
    ``DDPDistributedConfig``, the blocks are assigned within each group of
    ``num_trainers_per_group`` consecutive ranks.

    Args:
        blocks: Every block of every parameter, in block order.
        layouts: Each parameter's layout.
        state_nbytes: The bytes of each block's optimizer state.
        config: The distribution, or None for a single process.
        device: Where the communication buffers live (the parameters' device).

    Raises:
        RuntimeError: A config is given but ``torch.distributed`` is not initialised.
        ValueError: The world size is not a multiple of ``num_trainers_per_group``.
    """

    def __init__(
        self,
        blocks: Sequence[BlockSpec],
        layouts: Sequence[ParamLayout],
        state_nbytes: Sequence[int],
        config: DDPDistributedConfig | None,
        device: torch.device,
    ) -> None:
        self._group: dist.ProcessGroup | None = None
        group_size, group_rank = 1, 0
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
            group_rank = dist.get_rank(self._group)
        super().__init__(blocks, layouts, state_nbytes, group_size, group_rank)
        # Each rank packs its blocks' updates one after the other into a buffer as long as the
        # largest rank's; the all-gather returns every rank's buffer.
        self._offsets: list[int] = [0] * len(self._blocks)
        per_rank_numel = [0] * self.group_size
        for index, (block, owner) in enumerate(zip(self._blocks, self.owners)):
            self._offsets[index] = per_rank_numel[owner]
            per_rank_numel[owner] += block.numel
        buffer_numel = max(per_rank_numel)
        self._communicate_params: bool = config is not None and config.communicate_params
        dtype = config.communication_dtype if config is not None else torch.float32
        self._send: torch.Tensor = torch.zeros(buffer_numel, dtype=dtype, device=device)
        self._gathered: list[torch.Tensor] = [torch.zeros_like(self._send) for _ in range(self.group_size)]

    def block_inputs(self, tensors: Sequence[tuple[torch.Tensor, ...] | None]) -> dict[int, tuple[torch.Tensor, ...]]:
        inputs: dict[int, tuple[torch.Tensor, ...]] = {}
        for layout, given in zip(self._layouts, tensors):
            if given is None:
                continue
            for position, blocks in zip(layout.block_positions, zip(*(layout.split(tensor) for tensor in given))):
                if self.is_owned(position):
                    inputs[position] = tuple(block.clone(memory_format=torch.contiguous_format) for block in blocks)
        return inputs

    def block_updates(
        self, params: Sequence[torch.Tensor], directions: Mapping[int, torch.Tensor], stepped: Sequence[bool]
    ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        updates = self._all_gather(directions)
        return [
            (param_index, param_block, updates[position])
            for param_index, (layout, param, is_stepped) in enumerate(zip(self._layouts, params, stepped))
            if is_stepped
            for position, param_block in zip(layout.block_positions, layout.split(param))
        ]

    def apply_updates(
        self, params: Sequence[torch.Tensor], directions: Mapping[int, torch.Tensor], stepped: Sequence[bool], lrs: Sequence[float]
    ) -> None:
        if not self._communicate_params or self.group_size == 1:
            super().apply_updates(params, directions, stepped, lrs)
            return
        # The owners update their blocks (the same addition the others would do), and every rank
        # takes the updated blocks as gathered.
        regions = [
            (param_index, position, param_block)
            for param_index, (layout, param, is_stepped) in enumerate(zip(self._layouts, params, stepped))
            if is_stepped
            for position, param_block in zip(layout.block_positions, layout.split(param))
        ]
        updated = {
            position: param_block.add(directions[position].to(param_block.dtype), alpha=-lrs[param_index])
            for param_index, position, param_block in regions
            if position in directions
        }
        gathered = self._all_gather(updated)
        for _, position, param_block in regions:
            param_block.copy_(gathered[position])

    def _all_gather(self, directions: Mapping[int, torch.Tensor]) -> Mapping[int, torch.Tensor]:
        """Every block's update as its owner computed it (zeros where it had none when
        distributed; single process, only the given ones)."""
        if self.group_size == 1:
            return directions
        for position, block in enumerate(self._blocks):
            if self.is_owned(position):
                start, end = self._offsets[position], self._offsets[position] + block.numel
                direction = directions.get(position)
                if direction is None:
                    self._send[start:end].zero_()
                else:
                    self._send[start:end].copy_(direction.reshape(-1))
        dist.all_gather(self._gathered, self._send, group=self._group)
        self.bytes_sent += self._send.nbytes * (self.group_size - 1)
        self.bytes_received += self._send.nbytes * (self.group_size - 1)
        return {
            position: self._gathered[owner][offset : offset + block.numel].view(block.shape)
            for position, (block, owner, offset) in enumerate(zip(self._blocks, self.owners, self._offsets))
        }


_BLOCK_KEY: re.Pattern[str] = re.compile(r"block_(\d+)")


def checkpoint_writes(tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]], world_size: int) -> list[list[str]]:
    """Which rank writes which tensor of a ``DistributedShampoo`` state saved at ``world_size``
    ranks (``DDPDistributedConfig()`` or ``FullyShardDistributedConfig()``): each block's tensors
    go to the block's owner, everything else to rank 0.

    Blocks are the keys ``[..., "state", <param>, "block_<i>", ...]``, ordered as the optimizer
    orders them (parameters in the order they appear, then block index); a block's state size is
    the sum of its tensors' bytes, which is what the optimizer balances.

    Args:
        tensors: Logical tensor name (a JSON-list key path) -> (shape, dtype), e.g. a checkpoint
            index's layouts.
        world_size: The number of ranks to write for.

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
    sizes = [sum(math.prod(tensors[name][0]) * tensors[name][1].itemsize for name in blocks[block]) for block in ordered]
    writes: list[list[str]] = [[] for _ in range(world_size)]
    in_blocks: set[str] = set()
    for block, owner in zip(ordered, block_owners(sizes, world_size)):
        writes[owner].extend(blocks[block])
        in_blocks.update(blocks[block])
    writes[0][:0] = [name for name in tensors if name not in in_blocks]
    return writes
