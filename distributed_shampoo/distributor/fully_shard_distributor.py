# pyre-strict
"""FSDP2 (``fully_shard``): blocks of the global parameters, owned by one rank each.

Under FSDP2 each parameter is a DTensor sharded on dim 0 over a 1-D mesh: rank r holds the rows
``[start_r, end_r)`` of dim 0, a contiguous range of the parameter's elements. Blocks are those of
the global shape (``block_layout``), so a block may span several ranks' rows, and one rank owns
it (``block_owners``, as under DDP). In a parameter's merged shape (``merge_small_dims`` merges
adjacent dimensions), rank r's rows are again a contiguous range of dimension 0, so the rows a
block shares with a rank's shard are a sub-box of both: a *piece*. Each step:

1. ``block_inputs``: every rank sends each owner the pieces of its local gradient (and, for
   decoupled weight decay, of its local parameter) that fall in the owner's blocks; the owner
   assembles whole blocks (one all-to-all).
2. The owner computes the blocks' updates.
3. ``block_updates``: the owner sends each piece of an update back to the rank holding those rows,
   which applies it to its local shard (one all-to-all).

A rank receives exactly the blocks it owns and sends exactly its shard: no rank materialises a
parameter or gradient it does not own a block of.
"""

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from distributed_shampoo.distributor.block_distributor import BlockDistributor
from distributed_shampoo.distributor.block_layout import BlockSpec, ParamLayout


@dataclass(frozen=True)
class _Piece:
    """The rows one block shares with one rank's shard of its parameter.

    Attributes:
        param_index: The parameter.
        position: The block's position in the block list.
        peer: The other rank: the block's owner for a piece this rank holds, the holder for a
            piece of a block this rank owns.
        holder_index: The piece's region in the holder's local shard, viewed in the merged shape.
        block_elements: The piece's elements in the block, flattened (contiguous: whole rows of
            the block).
    """

    param_index: int
    position: int
    peer: int
    holder_index: "tuple[slice[int, int, None], ...]"
    block_elements: "slice[int, int, None]"

    @property
    def numel(self) -> int:
        return self.block_elements.stop - self.block_elements.start

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(index.stop - index.start for index in self.holder_index)


def _sharded(params: Sequence[torch.Tensor], hybrid: bool) -> tuple[DeviceMesh, list[DTensor]]:
    """The one mesh every parameter is sharded over, and the parameters as DTensors: ``Shard(0)``
    on a 1-D mesh, or with ``hybrid``, ``(Replicate(), Shard(0))`` on a 2-D one.

    Raises:
        ValueError: A parameter is not such a DTensor, or the parameters use different meshes.
    """
    config = "HybridShardDistributedConfig" if hybrid else "FullyShardDistributedConfig"
    expected = ((Replicate(), Shard(0)), 2) if hybrid else ((Shard(0),), 1)
    mesh: DeviceMesh | None = None
    sharded: list[DTensor] = []
    for index, param in enumerate(params):
        if not isinstance(param, DTensor):
            raise ValueError(
                f"{config}: parameter #{index} is a {type(param).__name__}, not a DTensor; "
                "apply torch.distributed.fsdp.fully_shard to the model (its root included) before building the optimizer"
            )
        if (tuple(param.placements), param.device_mesh.ndim) != expected or param.dim() == 0:
            raise ValueError(
                f"{config}: parameter #{index} is placed {tuple(param.placements)} on a "
                f"{param.device_mesh.ndim}-D mesh with shape {tuple(param.shape)}; expected fully_shard's {expected[0]} "
                f"on a {expected[1]}-D mesh"
            )
        if not param.to_local().is_contiguous():
            raise ValueError(f"{config}: parameter #{index}'s local shard is not contiguous")
        if mesh is None:
            mesh = param.device_mesh
        elif param.device_mesh != mesh:
            raise ValueError(f"{config}: parameter #{index} is on a different device mesh than #0")
        sharded.append(param)
    if mesh is None:
        raise ValueError(f"{config}: the optimizer has no parameters")
    return mesh, sharded


class FullyShardDistributor(BlockDistributor):
    """Blocks of FSDP2 parameters, each owned by one rank of their mesh (see the module docstring).

    Args:
        params: Every parameter: DTensors ``Shard(0)`` on one 1-D mesh (with ``hybrid``,
            ``(Replicate(), Shard(0))`` on one 2-D mesh: each replica distributes the blocks over
            its shard ranks, and the replicas compute the same steps).
        blocks: Every block of every parameter, in block order.
        layouts: Each parameter's layout (of its global shape).
        state_nbytes: The bytes of each block's optimizer state.
        hybrid: The parameters are sharded hybridly (HSDP).
        device_mesh: With ``hybrid``, the mesh the config names, or None.

    Raises:
        ValueError: A parameter is not a ``fully_shard`` DTensor, or the ranks' shards do not
            cover its rows.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        blocks: Sequence[BlockSpec],
        layouts: Sequence[ParamLayout],
        state_nbytes: Sequence[int],
        hybrid: bool = False,
        device_mesh: DeviceMesh | None = None,
    ) -> None:
        mesh, sharded = _sharded(params, hybrid)
        if hybrid and device_mesh is not None and device_mesh != mesh:
            raise ValueError(f"HybridShardDistributedConfig: device_mesh {device_mesh} is not the parameters' mesh {mesh}")
        # The shard dimension: the last (the only one without hybrid sharding).
        shard_dim = mesh.ndim - 1
        super().__init__(blocks, layouts, state_nbytes, mesh.size(shard_dim), mesh.get_local_rank(shard_dim))
        self._group: dist.ProcessGroup = mesh.get_group(shard_dim)
        locals_ = [param.to_local() for param in sharded]
        self._device: torch.device = locals_[0].device
        # Every rank's number of dim-0 rows of every parameter: shards are contiguous, in rank order.
        rows = torch.tensor([local.shape[0] for local in locals_], dtype=torch.int64, device=self._device)
        gathered = [torch.empty_like(rows) for _ in range(self.group_size)]
        dist.all_gather(gathered, rows, group=self._group)
        rows_per_rank = torch.stack(gathered).cpu().tolist()
        # One exchange dtype: every parameter's compute dtype converts to it and back exactly.
        self._dtype: torch.dtype = functools.reduce(
            torch.promote_types, (torch.promote_types(param.dtype, torch.float32) for param in params)
        )
        self._local_shapes: list[tuple[int, ...]] = []
        outgoing: list[_Piece] = []
        incoming: list[_Piece] = []
        for param_index, (param, layout) in enumerate(zip(params, layouts)):
            merged_starts = self._merged_row_starts(param_index, tuple(param.shape), layout, [ranks[param_index] for ranks in rows_per_rank])
            local_rows = merged_starts[self.group_rank + 1] - merged_starts[self.group_rank]
            self._local_shapes.append((local_rows,) + layout.merged_shape[1:])
            for position, box in zip(layout.block_positions, layout.block_boxes()):
                for holder in range(self.group_size):
                    start = max(box[0].start, merged_starts[holder])
                    stop = min(box[0].stop, merged_starts[holder + 1])
                    owner = self.owners[position]
                    if start >= stop or math.prod(len(axis) for axis in box[1:]) == 0 or self.group_rank not in (holder, owner):
                        continue
                    inner = math.prod(len(axis) for axis in box[1:])
                    holder_start = start - merged_starts[holder]
                    piece = _Piece(
                        param_index,
                        position,
                        owner if holder == self.group_rank else holder,
                        (slice(holder_start, holder_start + stop - start),) + tuple(slice(axis.start, axis.stop) for axis in box[1:]),
                        slice((start - box[0].start) * inner, (stop - box[0].start) * inner),
                    )
                    if holder == self.group_rank:
                        outgoing.append(piece)
                    if owner == self.group_rank:
                        incoming.append(piece)
        # The all-to-all sends one segment per peer, in rank order; within it, pieces go in block
        # order on both sides. (Sorting is stable.)
        self._outgoing: tuple[_Piece, ...] = tuple(sorted(outgoing, key=lambda piece: piece.peer))
        self._incoming: tuple[_Piece, ...] = tuple(sorted(incoming, key=lambda piece: piece.peer))

    def _merged_row_starts(
        self, param_index: int, shape: tuple[int, ...], layout: ParamLayout, rows: Sequence[int]
    ) -> list[int]:
        """Where each rank's shard starts in dimension 0 of the merged shape (and the end).

        Raises:
            ValueError: The shards do not add up to the parameter's rows.
        """
        if sum(rows) != shape[0]:
            raise ValueError(
                f"FullyShardDistributedConfig: the ranks' shards of parameter #{param_index} hold {sum(rows)} rows "
                f"of its {shape[0]}"
            )
        row_numel, merged_row_numel = math.prod(shape[1:]), layout.row_numel
        starts = [0]
        for count in rows:
            starts.append(starts[-1] + count)
        if merged_row_numel == 0 or row_numel == 0:
            return [0] * len(starts)
        # merge_small_dims merges dimension 0 only with the dimensions after it, so a row of the
        # merged shape is a whole number of the parameter's rows' elements.
        return [start * row_numel // merged_row_numel for start in starts]

    def agree_on_gradients(self, has_gradient: Sequence[bool]) -> None:
        flags = torch.tensor(has_gradient, dtype=torch.int32, device=self._device)
        dist.all_reduce(flags, group=self._group)
        disagreeing = [index for index, count in enumerate(flags.cpu().tolist()) if count not in (0, self.group_size)]
        if disagreeing:
            raise RuntimeError(
                f"FullyShardDistributedConfig: parameters #{disagreeing} have a gradient on some ranks and none on "
                "others; every rank must step the same parameters"
            )

    def block_inputs(self, tensors: Sequence[tuple[torch.Tensor, ...] | None]) -> dict[int, tuple[torch.Tensor, ...]]:
        merged = [None if given is None else tuple(self._merged(index, t) for t in given) for index, given in enumerate(tensors)]
        channels = [0 if given is None else len(given) for given in tensors]
        send, send_sizes = self._pack(
            (piece, [source[piece.holder_index] for source in sources])
            for piece in self._outgoing
            if (sources := merged[piece.param_index]) is not None
        )
        recv_sizes = [0] * self.group_size
        for piece in self._incoming:
            recv_sizes[piece.peer] += piece.numel * channels[piece.param_index]
        received = self._all_to_all(send, send_sizes, recv_sizes)
        blocks: dict[int, tuple[torch.Tensor, ...]] = {}
        for layout, count in zip(self._layouts, channels):
            for position in layout.block_positions:
                if count and self.is_owned(position):
                    shape = self._blocks[position].shape
                    blocks[position] = tuple(torch.empty(shape, dtype=self._dtype, device=self._device) for _ in range(count))
        offset = 0
        for piece in self._incoming:
            for block in blocks.get(piece.position, ()):
                block.view(-1)[piece.block_elements].copy_(received[offset : offset + piece.numel])
                offset += piece.numel
        return blocks

    def block_updates(
        self, params: Sequence[torch.Tensor], directions: Mapping[int, torch.Tensor], stepped: Sequence[bool]
    ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        send, send_sizes = self._pack(
            (piece, [directions[piece.position].reshape(-1)[piece.block_elements]])
            for piece in self._incoming
            if stepped[piece.param_index]
        )
        arriving = [piece for piece in self._outgoing if stepped[piece.param_index]]
        recv_sizes = [0] * self.group_size
        for piece in arriving:
            recv_sizes[piece.peer] += piece.numel
        received = self._all_to_all(send, send_sizes, recv_sizes)
        updates: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        offset = 0
        for piece in arriving:
            target = self._merged(piece.param_index, params[piece.param_index])[piece.holder_index]
            updates.append((piece.param_index, target, received[offset : offset + piece.numel].view(piece.shape)))
            offset += piece.numel
        return updates

    def _merged(self, param_index: int, local: torch.Tensor) -> torch.Tensor:
        return local.view(self._local_shapes[param_index])

    def _pack(self, pieces: Iterable[tuple[_Piece, list[torch.Tensor]]]) -> tuple[torch.Tensor, list[int]]:
        """One buffer of the given pieces' data, in order, and the elements it sends each peer."""
        listed = list(pieces)
        sizes = [0] * self.group_size
        for piece, data in listed:
            sizes[piece.peer] += piece.numel * len(data)
        buffer = torch.empty(sum(sizes), dtype=self._dtype, device=self._device)
        offset = 0
        for piece, data in listed:
            for part in data:
                buffer[offset : offset + piece.numel].view(part.shape).copy_(part)
                offset += piece.numel
        return buffer, sizes

    def _all_to_all(self, send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int]) -> torch.Tensor:
        received = torch.empty(sum(recv_sizes), dtype=self._dtype, device=self._device)
        dist.all_to_all_single(received, send, recv_sizes, send_sizes, group=self._group)
        element_size = received.element_size()
        self.bytes_sent += (sum(send_sizes) - send_sizes[self.group_rank]) * element_size
        self.bytes_received += (sum(recv_sizes) - recv_sizes[self.group_rank]) * element_size
        return received
