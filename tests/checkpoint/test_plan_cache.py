# pyre-strict
"""A save that repeats the last save's structure reuses its plan, exactly, on real gloo ranks."""

import tempfile
import unittest
from pathlib import Path

import torch

from distributed_shampoo.checkpoint import InconsistentStateError, load_checkpoint, save_checkpoint, verify_checkpoint
from distributed_shampoo.checkpoint import plan_cache
from distributed_shampoo.checkpoint.parse import read_index
from distributed_shampoo.launch import run_on_ranks


def _state(rank: int, seed: int, extra: bool = False, lr: float = 0.1, step: float = 1.0) -> dict[str, object]:
    """Rank r's own block, a replicated plain tensor (written by rank 0) and a value."""
    generator = torch.Generator().manual_seed(seed * 10 + rank)
    state: dict[str, object] = {f"block_{rank}": torch.randn(3, 2, generator=generator), "step": torch.tensor(step), "lr": lr}
    if extra and rank == 1:
        state["block_extra"] = torch.randn(4, generator=generator)
    return {"state": state}


def _zeros_like(state: dict[str, object]) -> dict[str, object]:
    inner = state["state"]
    assert isinstance(inner, dict)
    return {"state": {key: torch.zeros_like(value) if isinstance(value, torch.Tensor) else 0.0 for key, value in inner.items()}}


def _assert_loads_back(directory: Path, state: dict[str, object]) -> None:
    verify_checkpoint(directory)
    template = _zeros_like(state)
    load_checkpoint(directory, template)
    expected, loaded = state["state"], template["state"]
    assert isinstance(expected, dict) and isinstance(loaded, dict)
    assert loaded.keys() == expected.keys(), (loaded.keys(), expected.keys())
    for key, value in expected.items():
        assert torch.equal(loaded[key], value) if isinstance(value, torch.Tensor) else loaded[key] == value, key


def _expect_inconsistent(directory: Path, state: dict[str, object], message: str) -> None:
    try:
        save_checkpoint(directory, state)
    except InconsistentStateError as error:
        assert message in str(error), error
    else:
        raise AssertionError("no InconsistentStateError")
    assert not directory.exists()


def _saves(rank: int, world_size: int, root: str) -> None:
    base = Path(root)
    first = _state(rank, seed=1)
    save_checkpoint(base / "first", first)
    generation = plan_cache.remembered_generation() if rank == 0 else ""
    if rank == 0:
        assert generation == read_index(base / "first").save_id

    # The same structure with new values (the replicated tensor and the value too): the plan is
    # reused, and the checkpoint holds the new values.
    second = _state(rank, seed=2, lr=0.2, step=2.0)
    save_checkpoint(base / "second", second)
    if rank == 0:
        assert plan_cache.remembered_generation() == generation
    _assert_loads_back(base / "second", second)
    _assert_loads_back(base / "first", first)

    # Values the ranks disagree on are still caught while the plan is reused.
    _expect_inconsistent(base / "lr", _state(rank, seed=3, lr=0.1 * (rank + 1)), "lr\"]: rank 0 has value 0.1 but rank 1 has 0.2")
    _expect_inconsistent(
        base / "step", _state(rank, seed=3, step=float(rank)), '["state", "step"]: rank 0 and rank 1 hold different values'
    )

    # A new tensor on one rank: planned again.
    third = _state(rank, seed=4, extra=True)
    save_checkpoint(base / "third", third)
    if rank == 0:
        assert plan_cache.remembered_generation() == read_index(base / "third").save_id
    _assert_loads_back(base / "third", third)

    # Rank 0 forgets while rank 1 still offers to repeat: every rank sends its whole plan again.
    if rank == 0:
        plan_cache.forget()
    fourth = _state(rank, seed=5, extra=True)
    save_checkpoint(base / "fourth", fourth)
    if rank == 0:
        assert plan_cache.remembered_generation() == read_index(base / "fourth").save_id
    _assert_loads_back(base / "fourth", fourth)


class PlanCacheTest(unittest.TestCase):
    def test_repeated_saves_reuse_the_plan_exactly_and_replan_when_it_changes(self) -> None:
        with tempfile.TemporaryDirectory() as root:
            run_on_ranks(2, _saves, root)
