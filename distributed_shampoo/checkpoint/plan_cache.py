# pyre-strict
"""The last save's plan, remembered so that the next save of the same structure reuses it.

A training job saves the same structure again and again; only the values change. So every rank
remembers the local plan it sent in its last save on a group and the decisions it was told, and
rank 0 remembers every rank's plan and the global plan, all under that save's *generation* (the
save id of the save that planned it). A rank whose new plan repeats the remembered one exactly
(the same tensors, dtypes, shapes and chunks, the same containers and the same value names, in
the same order) sends rank 0 only its values and the generation. Rank 0 rebuilds the plans it was
not sent; when every rank repeats its generation, it reuses the global plan's decisions and
layouts and merges only the values (which must still agree), and each rank reuses its own
decisions. The result is exactly what planning again would give: the global plan is a pure
function of the local plans.

A rank that repeats a generation rank 0 does not hold (an earlier exchange failed midway) makes
rank 0 ask every rank for its whole plan. One save per group is remembered; saving two structures
in turn on one group plans every time, as without this module.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch.distributed as dist

from distributed_shampoo.checkpoint.collectives import Group
from distributed_shampoo.checkpoint.errors import DistributedSaveError
from distributed_shampoo.checkpoint.plan import GlobalPlan, LocalPlan, merge_values, plan_global

# The group a plan was exchanged on: the process group (None: the default one), rank, world size.
_GroupKey = tuple[dist.ProcessGroup | None, int, int]


def _key(group: Group) -> _GroupKey:
    return (group.process_group, group.rank, group.world_size)


@dataclass(frozen=True)
class _RankMemory:
    """What this rank planned in one save and what rank 0 decided for it."""

    group: _GroupKey
    generation: str
    plan: LocalPlan
    writes: tuple[str, ...]
    replicas: tuple[str, ...]


@dataclass(frozen=True)
class _CoordinatorMemory:
    """Rank 0: every rank's plan in one save, and the global plan made from them."""

    group: _GroupKey
    generation: str
    plans: tuple[LocalPlan, ...]
    plan: GlobalPlan


class _Memory:
    """The last save only, whichever its group: memory stays bounded by one plan."""

    rank: _RankMemory | None = None
    coordinator: _CoordinatorMemory | None = None


_memory = _Memory()


def forget() -> None:
    """Forgets the remembered plan: the next save plans from scratch."""
    _memory.rank = _memory.coordinator = None


def remembered_generation() -> str | None:
    """Rank 0: the generation of the global plan it remembers, if any."""
    return _memory.coordinator.generation if _memory.coordinator is not None else None


@dataclass(frozen=True)
class Offer:
    """What this rank sends rank 0 (``plan``: only the values when it ``repeats`` a remembered
    generation), and the remembered decisions it then reuses."""

    plan: LocalPlan
    repeats: str | None
    remembered: _RankMemory | None


def offer(group: Group, plan: LocalPlan) -> Offer:
    """This rank's offer: only the values of ``plan`` and the remembered generation if ``plan``
    repeats the plan this rank remembers for ``group``; else ``plan`` itself."""
    remembered = _memory.rank
    if remembered is not None and remembered.group == _key(group) and _repeats(plan, remembered.plan):
        return Offer(LocalPlan((), plan.objects, {}), remembered.generation, remembered)
    return Offer(plan, None, None)


def _repeats(plan: LocalPlan, before: LocalPlan) -> bool:
    return (
        plan.tensors == before.tensors
        and list(plan.containers.items()) == list(before.containers.items())
        and list(plan.objects) == list(before.objects)
    )


@dataclass(frozen=True)
class Coordinated:
    """Rank 0's plan for one save, and whether every rank repeated the remembered one (each
    then reuses its own remembered decisions, which rank 0 need not send)."""

    plan: GlobalPlan
    reused: bool


def coordinate(group: Group, sent: Sequence[tuple[LocalPlan, str | None]], save_id: str) -> Coordinated | None:
    """Rank 0: the global plan from every rank's ``(plan, repeated generation)``: the remembered
    one with the new values when every rank repeats it, else ``plan_global`` of every rank's
    whole plan (remembered under ``save_id``).

    Returns:
        The plan, or None when a rank repeats a generation rank 0 does not remember for
        ``group``: every rank must then send its whole plan.

    Raises:
        InconsistentStateError: The ranks disagree (as ``plan_global`` and ``merge_values``).
    """
    remembered = _memory.coordinator
    if remembered is not None and remembered.group != _key(group):
        remembered = None
    repeated = [generation is not None for _, generation in sent]
    if any(repeated) and (remembered is None or any(g is not None and g != remembered.generation for _, g in sent)):
        return None
    if remembered is not None and all(repeated):
        values: list[Mapping[str, object]] = [plan.objects for plan, _ in sent]
        return Coordinated(replace(remembered.plan, objects=merge_values(values)), True)
    plans = [
        replace(remembered.plans[rank], objects=plan.objects) if remembered is not None and repeats else plan
        for rank, ((plan, _), repeats) in enumerate(zip(sent, repeated))
    ]
    global_plan = plan_global(plans)
    _memory.coordinator = _CoordinatorMemory(_key(group), save_id, tuple(plans), global_plan)
    return Coordinated(global_plan, False)


def settle(
    group: Group,
    offered: Offer | None,
    plan: LocalPlan,
    save_id: str,
    decided: tuple[tuple[str, ...], tuple[str, ...]] | None,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """This rank's ``(writes, replicas)`` once rank 0 has decided on what this rank ``offered``
    (None: its whole ``plan``): ``decided``, remembered with ``plan`` under the save's
    ``save_id``; or, when rank 0 sent None (it reused the remembered plan), the ones this rank
    remembers.

    Raises:
        DistributedSaveError: Rank 0 reused a plan this rank did not offer to repeat.
    """
    if decided is None:
        if offered is None or offered.remembered is None:
            raise DistributedSaveError("rank 0 reused a plan this rank did not offer to repeat")
        return offered.remembered.writes, offered.remembered.replicas
    _memory.rank = _RankMemory(_key(group), save_id, plan, *decided)
    return decided
