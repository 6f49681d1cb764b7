# pyre-strict
"""The two collectives a save needs, over ``torch.distributed`` or a single process."""

from dataclasses import dataclass
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Group:
    """The ranks that save one checkpoint together.

    ``process_group`` is ``None`` for a single-process save (``torch.distributed`` not
    initialised); otherwise the group whose ranks all call ``save_checkpoint``.
    """

    rank: int
    world_size: int
    process_group: dist.ProcessGroup | None
    distributed: bool

    @staticmethod
    def resolve(process_group: dist.ProcessGroup | None) -> "Group":
        """The group a save runs on: ``process_group``, the default group, or a single process."""
        if not (dist.is_available() and dist.is_initialized()):
            return Group(rank=0, world_size=1, process_group=None, distributed=False)
        return Group(
            rank=dist.get_rank(process_group),
            world_size=dist.get_world_size(process_group),
            process_group=process_group,
            distributed=True,
        )

    def all_gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order (pickled small metadata, never tensor data)."""
        if not self.distributed:
            return [value]
        gathered: list[T | None] = [None for _ in range(self.world_size)]
        dist.all_gather_object(gathered, value, group=self.process_group)
        # pyre-ignore[7]: all_gather_object filled every slot.
        return gathered

    def broadcast_from_first(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        box: list[T | None] = [value]
        src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
        dist.broadcast_object_list(box, src=src, group=self.process_group)
        # pyre-ignore[7]: the broadcast filled the slot.
        return box[0]
