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

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch.distributed as dist

from distributed_shampoo.checkpoint.errors import DistributedSaveError
from distributed_shampoo.checkpoint.plan import GlobalPlan, LocalPlan, merge_values, plan_global

# The group a plan was exchanged on: the process group (None: the default one), rank, world size.
GroupKey = tuple[dist.ProcessGroup | None, int, int]


@dataclass(frozen=True)
class _RankMemory:
    """What this rank planned in one save and what rank 0 decided for it."""

    group: GroupKey
    generation: str
    plan: LocalPlan
    writes: tuple[str, ...]
    replicas: tuple[str, ...]


@dataclass(frozen=True)
class _CoordinatorMemory:
    """Rank 0: every rank's plan in one save, and the global plan made from them."""

    group: GroupKey
    generation: str
    plans: tuple[LocalPlan, ...]
    plan: GlobalPlan


# One save is remembered (the last one), whichever its group: memory stays bounded by one plan.
_rank_memory: list[_RankMemory] = []
_coordinator_memory: list[_CoordinatorMemory] = []


def forget() -> None:
    """Forgets the remembered plan: the next save plans from scratch."""
    _rank_memory.clear()
    _coordinator_memory.clear()


@dataclass(frozen=True)
class Offer:
    """What this rank sends rank 0 (``plan``: only the values when it ``repeats`` a remembered
    generation), and the remembered decisions it then reuses."""

    plan: LocalPlan
    repeats: str | None
    remembered: _RankMemory | None


def offer(group: GroupKey, plan: LocalPlan) -> Offer:
    """This rank's offer: only the values of ``plan`` and the remembered generation if ``plan``
    repeats the plan this rank remembers for ``group``; else ``plan`` itself."""
    remembered = next((memory for memory in _rank_memory if memory.group == group), None)
    if remembered is not None and _repeats(plan, remembered.plan):
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
    """Rank 0's plan for one save.

    Attributes:
        plan: The global plan.
        generation: The generation the ranks remember it under.
        reused: Whether every rank repeated the remembered plan: each then reuses its own
            remembered decisions, which rank 0 need not send.
    """

    plan: GlobalPlan
    generation: str
    reused: bool


def coordinate(group: GroupKey, sent: Sequence[tuple[LocalPlan, str | None]], save_id: str) -> Coordinated | None:
    """Rank 0: the global plan from every rank's ``(plan, repeated generation)``: the remembered
    one with the new values when every rank repeats it, else ``plan_global`` of every rank's
    whole plan (remembered under ``save_id``).

    Returns:
        The plan, or None when a rank repeats a generation rank 0 does not remember for
        ``group``: every rank must then send its whole plan.

    Raises:
        InconsistentStateError: The ranks disagree (as ``plan_global`` and ``merge_values``).
    """
    remembered = next((memory for memory in _coordinator_memory if memory.group == group), None)
    repeated = [generation is not None for _, generation in sent]
    if any(repeated) and (remembered is None or any(g is not None and g != remembered.generation for _, g in sent)):
        return None
    plans = [
        replace(remembered.plans[rank], objects=plan.objects) if remembered is not None and repeats else plan
        for rank, ((plan, _), repeats) in enumerate(zip(sent, repeated))
    ]
    if remembered is not None and all(repeated):
        return Coordinated(replace(remembered.plan, objects=merge_values(plans)), remembered.generation, True)
    global_plan = plan_global(plans)
    _coordinator_memory[:] = [_CoordinatorMemory(group, save_id, tuple(plans), global_plan)]
    return Coordinated(global_plan, save_id, False)


def settle(
    group: GroupKey,
    offered: Offer | None,
    plan: LocalPlan,
    generation: str,
    decided: tuple[tuple[str, ...], tuple[str, ...]] | None,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """This rank's ``(writes, replicas)`` once rank 0 has decided on the plan this rank
    ``offered`` (None: its whole ``plan``): ``decided``, remembered with ``plan`` under
    ``generation``; or, when rank 0 sent None (it reused the remembered plan), the ones this rank
    remembers.

    Raises:
        DistributedSaveError: Rank 0 reused a plan this rank did not offer to repeat.
    """
    if decided is None:
        remembered = offered.remembered if offered is not None else None
        if remembered is None or remembered.generation != generation:
            raise DistributedSaveError(f"rank 0 reused plan {generation}, which this rank did not offer to repeat")
        return remembered.writes, remembered.replicas
    _rank_memory[:] = [_RankMemory(group, generation, plan, *decided)]
    return decided
