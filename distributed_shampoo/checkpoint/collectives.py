# pyre-strict
"""The collectives of the checkpoint layer, with a bounded timeout and typed failures.

Every collective exchanges small pickled metadata (plans, outcomes), never tensor data. Plans and
records go to rank 0 and decisions come back from it (``gather_to_first``, ``scatter_from_first``:
point-to-point, so rank 0 moves the sum of the payloads, not world size x the largest), which
keeps the traffic linear in the number of tensors. A rank
that dies or stops answering makes the others raise ``DistributedSaveError`` within
``timeout_s`` (a dead peer is usually noticed at once: its connection closes), never hang until
the process group's own timeout.
"""

import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from distributed_shampoo.checkpoint.errors import DistributedSaveError

T = TypeVar("T")

# How long a rank waits for the others at one of the layer's collectives. Ranks reach a collective
# at different times (one writes more bytes than another), so this bounds a hang, not a save.
DEFAULT_COLLECTIVE_TIMEOUT_S: float = 900.0


@dataclass(frozen=True)
class Group:
    """The ranks that save (or load, with the manager) one checkpoint together.

    Attributes:
        rank: This rank's position in the group.
        world_size: The number of ranks.
        process_group: The group (``None``: the default group, or a single process when
            ``distributed`` is false).
        distributed: Whether ``torch.distributed`` is initialised.
        timeout_s: How long a collective waits for the other ranks.
    """

    rank: int
    world_size: int
    process_group: dist.ProcessGroup | None
    distributed: bool
    timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S

    @staticmethod
    def resolve(process_group: dist.ProcessGroup | None, timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> "Group":
        """The group a save runs on: ``process_group``, the default group, or a single process."""
        if not (dist.is_available() and dist.is_initialized()):
            return Group(rank=0, world_size=1, process_group=None, distributed=False, timeout_s=timeout_s)
        return Group(
            rank=dist.get_rank(process_group),
            world_size=dist.get_world_size(process_group),
            process_group=process_group,
            distributed=True,
            timeout_s=timeout_s,
        )

    def all_gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order.

        Raises:
            DistributedSaveError: Another rank died or did not arrive within ``timeout_s``.
        """
        if not self.distributed:
            return [value]
        device = self._device()
        payload = _encode(value, device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.world_size)]
        self._run(dist.all_gather, sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=device))
        longest = max(int(size.item()) for size in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[: payload.numel()] = payload
        gathered = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(self.world_size)]
        self._run(dist.all_gather, gathered, padded)
        return [_decode(data[: int(size.item())]) for data, size in zip(gathered, sizes)]

    def gather_to_first(self, value: T) -> list[T] | None:
        """Every rank's ``value``, in rank order, on rank 0; None on the other ranks.

        Raises:
            DistributedSaveError: As ``all_gather``.
        """
        if not self.distributed:
            return [value]
        device = self._device()
        payload = _encode(value, device)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)] if self.rank == 0 else None
        self._run(dist.gather, size, sizes, self._global_rank(0))
        if sizes is None:
            self._wait(dist.isend(payload, self._global_rank(0), group=self.process_group))
            return None
        buffers = [payload] + [torch.empty(int(size.item()), dtype=torch.uint8, device=device) for size in sizes[1:]]
        works = [dist.irecv(buffer, self._global_rank(rank), group=self.process_group) for rank, buffer in enumerate(buffers) if rank]
        for work in works:
            self._wait(work)
        return [_decode(buffer) for buffer in buffers]

    def scatter_from_first(self, values: list[T] | None) -> T:
        """Rank r receives ``values[r]`` from rank 0 (``values`` is read on rank 0 only).

        Raises:
            DistributedSaveError: As ``all_gather``.
        """
        if not self.distributed:
            if values is None:
                raise DistributedSaveError("scatter_from_first: rank 0 has no values to send")
            return values[0]
        device = self._device()
        size = torch.zeros(1, dtype=torch.int64, device=device)
        if self.rank != 0:
            self._run(dist.scatter, size, None, self._global_rank(0))
            buffer = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
            self._wait(dist.irecv(buffer, self._global_rank(0), group=self.process_group))
            return _decode(buffer)
        if values is None or len(values) != self.world_size:
            raise DistributedSaveError(f"scatter_from_first: rank 0 needs one value per rank ({self.world_size})")
        payloads = [_encode(value, device) for value in values]
        sizes = [torch.tensor([payload.numel()], dtype=torch.int64, device=device) for payload in payloads]
        self._run(dist.scatter, size, sizes, self._global_rank(0))
        works = [dist.isend(payload, self._global_rank(rank), group=self.process_group) for rank, payload in enumerate(payloads) if rank]
        for work in works:
            self._wait(work)
        return values[0]

    def broadcast_from_first(self, value: T) -> T:
        """Rank 0's ``value`` on every rank.

        Raises:
            DistributedSaveError: As ``all_gather``.
        """
        if not self.distributed:
            return value
        device = self._device()
        src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
        payload = pickle.dumps(value) if self.rank == 0 else b""
        size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
        self._run(dist.broadcast, size, src)
        data = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
        if self.rank == 0:
            data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        self._run(dist.broadcast, data, src)
        return _decode(data)

    def _global_rank(self, rank: int) -> int:
        return dist.get_global_rank(self.process_group, rank) if self.process_group is not None else rank

    def _device(self) -> torch.device:
        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _run(self, collective, *args: object) -> None:  # pyre-ignore[2]: a torch.distributed collective
        try:
            work = collective(*args, group=self.process_group, async_op=True)
        except RuntimeError as error:
            raise self._failure(error) from None
        self._wait(work)

    def _wait(self, work: dist.Work | None) -> None:
        try:
            if work is not None:
                work.wait(timeout=timedelta(seconds=self.timeout_s))
        except RuntimeError as error:
            raise self._failure(error) from None

    def _failure(self, error: RuntimeError) -> DistributedSaveError:
        return DistributedSaveError(
            f"rank {self.rank}: another rank died or did not reach the checkpoint collective within "
            f"{self.timeout_s:.0f}s ({str(error).splitlines()[0][:200]})"
        )


def _encode(value: object, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8).to(device)


def _decode(payload: torch.Tensor) -> T:  # pyre-ignore[34]: the caller knows what its ranks sent
    return pickle.loads(payload.cpu().numpy().tobytes())  # our own ranks' metadata
