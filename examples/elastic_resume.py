# pyre-strict
"""The README's main job: save block-owned optimizer state on 4 ranks, resume on 2 and on 3.

Shampoo cuts every parameter into blocks that depend only on its shape; the world size only
decides which rank owns which block. This demo builds Shampoo-shaped state (factor matrices,
inverse roots, momentum) for a small model, saves it from 4 gloo ranks, then loads it on 2 and on
3 ranks, where every rank asks only for the blocks it now owns, and checks every tensor bit for
bit.
"""

import tempfile
import time
import zlib
from pathlib import Path

import torch

from distributed_shampoo.checkpoint import load_checkpoint, read_checkpoint_index, save_checkpoint, verify_checkpoint
from distributed_shampoo.launch import run_on_ranks
from distributed_shampoo.utils.shampoo_utils import distribute_buffer_sizes, merge_small_dims, multi_dim_split

PARAMETERS: dict[str, tuple[int, ...]] = {"conv.weight": (64, 3, 7, 7), "fc1.weight": (1000, 512), "fc1.bias": (1000,), "fc2.weight": (10, 1000)}
MAX_PRECONDITIONER_DIM = 256


def blocks() -> list[tuple[str, int, tuple[int, ...]]]:
    """(parameter, block index, block shape) for every block, the same at any world size."""
    result = []
    for name, shape in PARAMETERS.items():
        merged = merge_small_dims(shape, MAX_PRECONDITIONER_DIM)
        for index, block in enumerate(multi_dim_split(torch.empty(merged, device="meta"), MAX_PRECONDITIONER_DIM)):
            result.append((name, index, tuple(block.shape)))
    return result


def owner_of_blocks(world_size: int) -> list[int]:
    sizes = [4 * sum(d * d for d in shape) for _, _, shape in blocks()]
    return [rank for _, rank in distribute_buffer_sizes(sizes, world_size)]


def block_state(name: str, index: int, shape: tuple[int, ...], zeros: bool) -> dict[str, object]:
    generator = torch.Generator().manual_seed(zlib.crc32(f"{name}/{index}".encode()))  # hash() is salted per process
    make = (lambda *s: torch.zeros(s)) if zeros else (lambda *s: torch.randn(s, generator=generator))
    return {
        "shampoo": {
            "factor_matrices": {dim: make(size, size) for dim, size in enumerate(shape)},
            "inv_factor_matrices": {dim: make(size, size) for dim, size in enumerate(shape)},
        },
        "momentum": make(*shape),
    }


def optimizer_state(rank: int, world_size: int, zeros: bool) -> dict[str, object]:
    owners = owner_of_blocks(world_size)
    state: dict[str, dict[str, object]] = {}
    for name in PARAMETERS:
        state[name] = {"step": 0 if zeros else 100}
    for (name, index, shape), owner in zip(blocks(), owners):
        if owner == rank:
            state[name][f"block_{index}"] = block_state(name, index, shape, zeros)
    return {"state": state, "param_groups": {"lr": 0.0 if zeros else 0.01, "betas": (0.0, 0.0) if zeros else (0.9, 0.999)}}


def save(rank: int, world_size: int, directory: str) -> None:
    save_checkpoint(directory, optimizer_state(rank, world_size, zeros=False), metadata={"step": 100})


def resume(rank: int, world_size: int, directory: str) -> None:
    template = optimizer_state(rank, world_size, zeros=True)
    load_checkpoint(directory, template)
    expected = optimizer_state(rank, world_size, zeros=False)
    mismatches = [key for key, ok in _compare(template, expected, "") if not ok]
    if mismatches:
        raise AssertionError(f"rank {rank}/{world_size}: {mismatches[:3]} differ")


def _compare(actual: object, expected: object, path: str) -> list[tuple[str, bool]]:
    if isinstance(expected, dict):
        assert isinstance(actual, dict)
        return [item for key in expected for item in _compare(actual[key], expected[key], f"{path}/{key}")]
    if isinstance(expected, torch.Tensor):
        return [(path, isinstance(actual, torch.Tensor) and torch.equal(actual, expected))]
    return [(path, actual == expected and type(actual) is type(expected))]


def main() -> None:
    print(f"{len(blocks())} blocks (max_preconditioner_dim={MAX_PRECONDITIONER_DIM}), independent of the world size")
    with tempfile.TemporaryDirectory() as tmp:
        directory = str(Path(tmp) / "step-000100")
        start = time.perf_counter()
        run_on_ranks(4, save, directory)
        index = verify_checkpoint(directory)
        print(f"saved on 4 ranks in {time.perf_counter() - start:.1f}s: {len(index.weight_map)} tensors, "
              f"{index.total_size / 2**20:.1f} MiB, checksums verified")
        files = {file: 0 for file in index.shard_files()}
        for file in index.weight_map.values():
            files[file] += 1
        for file, count in files.items():
            print(f"  {file}: {count} tensors")
        print("\n| resumed on | blocks per rank | every tensor bit-exact | seconds |\n|---|---|---|---|")
        for world_size in (2, 3):
            owners = owner_of_blocks(world_size)
            start = time.perf_counter()
            run_on_ranks(world_size, resume, directory)
            per_rank = [owners.count(rank) for rank in range(world_size)]
            print(f"| {world_size} ranks | {per_rank} | yes | {time.perf_counter() - start:.1f} |")
        print(f"\nuser metadata: {read_checkpoint_index(directory).user_metadata}")


if __name__ == "__main__":
    main()
