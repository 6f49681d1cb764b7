# pyre-strict
"""Checkpoint save and reshard-load against DCP, torch.save and the disk's limit, in one run.

State: Shampoo-like, block-owned (each block on one rank, as the optimizer's ``block_owners`` assigns
it): per block of shape (w, w/2) two factor matrices, two inverse factors and three block-shaped
tensors, float32. Saves run on ``--save-ranks`` gloo ranks, loads on ``--load-ranks`` (a
different number: resharding) with a cold page cache (``posix_fadvise(DONTNEED)``). Every time is
barrier to barrier, so the slowest rank counts; our timed saves repeat the structure of the save
before them and so reuse its plan (``plan_cache``), and "(new plan)" is the same save planning
from scratch, as a first save does; the median of ``--repeats`` is reported, and
beside it the best run (ratios of best to best). Within a repeat the methods run in an order
drawn anew for each repeat.

The loads' baselines: the raw read, each rank's equal share of the files read sequentially (the
disk's limit), and the owned bytes read, exactly the bytes of the tensors the rank loads, where the
save put them (the disk's limit for a load that reads nothing it does not own); each also read a
second time, from the page cache.

Every timed save writes into a directory the previous run's deletion just emptied. On the VM these
numbers come from, writing into memory pages never used before costs many times more than writing
into pages a deleted file freed; a benchmark that keeps some methods' output and deletes others'
measures that instead of the methods.

    python -m benchmarks.checkpoint_benchmark --repeats 7 --out docs/benchmark-results.json
"""

from __future__ import annotations  # memoryview[int] annotations are not subscriptable at runtime in 3.11

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from distributed_shampoo.checkpoint import load_checkpoint, plan_cache, save_checkpoint
from distributed_shampoo.checkpoint.plan import named_leaves
from distributed_shampoo.checkpoint.writer import tensor_bytes
from distributed_shampoo.distributor.block_distributor import block_owners
from distributed_shampoo.launch import run_on_ranks
from distributed_shampoo.utils.shampoo_checkpoint_utils import flatten

_Method = TypeVar("_Method")

# (block width, number of blocks): ~460 MiB in 798 tensors, and ~230 MiB in 6,398 tensors.
STATES: dict[int, int] = {512: 114, 128: 914}


def block_tensors(width: int, block: int) -> dict[str, object]:
    """The seven state tensors of one block, with values that depend on the block."""
    torch.manual_seed(block)
    rows, cols = width, width // 2
    return {
        "factor_matrices": {"0": torch.randn(rows, rows), "1": torch.randn(cols, cols)},
        "inv_factor_matrices": {"0": torch.randn(rows, rows), "1": torch.randn(cols, cols)},
        "filtered_grad": torch.randn(rows, cols),
        "momentum": torch.randn(rows, cols),
        "grafting_state": torch.randn(rows, cols),
    }


def owned_blocks(width: int, world_size: int, rank: int) -> list[int]:
    block_bytes = 4 * (2 * width * width + 2 * (width // 2) ** 2 + 3 * width * (width // 2))
    owners = block_owners([block_bytes] * STATES[width], world_size)
    return [block for block, owner in enumerate(owners) if owner == rank]


def shampoo_state(width: int, world_size: int, rank: int, zeros: bool = False) -> dict[str, object]:
    """This rank's blocks, as the optimizer's ``distributed_state_dict`` holds them: the
    parameter's state flattened to JSON-list keys."""
    blocks = {}
    for block in owned_blocks(width, world_size, rank):
        tensors = block_tensors(width, block)
        blocks[f"block_{block}"] = _map_tensors(tensors, torch.zeros_like) if zeros else tensors
    return {"state": {"model.weight": flatten(blocks)}}


def _map_tensors(node: object, fn: Callable[[torch.Tensor], torch.Tensor]) -> object:
    if isinstance(node, dict):
        return {key: _map_tensors(value, fn) for key, value in node.items()}
    assert isinstance(node, torch.Tensor)
    return fn(node)


def _leaves(node: object) -> list[torch.Tensor]:
    if isinstance(node, dict):
        return [leaf for value in node.values() for leaf in _leaves(value)]
    assert isinstance(node, torch.Tensor)
    return [node]


def _in_turn(methods: dict[str, _Method], repeat: int) -> list[tuple[str, _Method]]:
    """The methods in the order repeat ``repeat`` runs them: a permutation drawn from the repeat's
    number (the same on every rank), so no method always follows the same other one, whose
    leftovers in the page cache and in free memory might speed or slow it."""
    items = list(methods.items())
    random.Random(repeat).shuffle(items)
    return items


def _timed(fn: Callable[[], object]) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def _raw_write(directory: Path, rank: int, state: dict[str, object]) -> None:
    """The disk's limit: the same bytes in one writev stream, then fsync."""
    directory.mkdir(exist_ok=True)
    fd = os.open(directory / f"rank{rank}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        views = [tensor_bytes(t) for t in _leaves(state)]
        for start in range(0, len(views), 1024):
            os.writev(fd, views[start : start + 1024])
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_planning_anew(directory: Path, state: dict[str, object]) -> None:
    """Our save when no rank remembers the last save's plan (a first save, or a new structure):
    every rank sends its whole plan and rank 0 plans again."""
    plan_cache.forget()
    save_checkpoint(directory, state)


def _torch_save(directory: Path, rank: int, state: dict[str, object]) -> None:
    directory.mkdir(exist_ok=True)
    path = directory / f"rank{rank}.pt"
    torch.save(state, path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


# The saves the load phase reads, written once before the timed saves.
LOADED: tuple[str, ...] = ("distributed_shampoo", "dcp.save", "dcp.save HF")


def _copy_for_load(root: str, method: str) -> Path:
    return Path(root) / "for-load" / method.replace(" ", "_")


def _save_methods(rank: int) -> dict[str, Callable[[Path, dict[str, object]], object]]:
    return {
        "distributed_shampoo": save_checkpoint,
        "distributed_shampoo (new plan)": _save_planning_anew,
        "raw write+fsync": lambda d, s: _raw_write(d, rank, s),
        "torch.save+fsync": lambda d, s: _torch_save(d, rank, s),
        "dcp.save": lambda d, s: dcp.save(s, checkpoint_id=str(d)),
        "dcp.save HF": lambda d, s: dcp.save(s, storage_writer=dcp.HuggingFaceStorageWriter(str(d), save_distributed=True)),
    }


def bench_save(rank: int, world_size: int, root: str, width: int, repeats: int, results: str) -> None:
    state = shampoo_state(width, world_size, rank)
    # Peak memory: one save of ours first, before any other method can raise the high-water mark.
    rss_before = _rss_bytes()
    _timed(lambda: save_checkpoint(Path(root) / "peak-memory", state))
    peak_extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    methods = _save_methods(rank)
    (Path(root) / "for-load").mkdir(exist_ok=True)
    for method in LOADED:  # the load phase's copies, untimed
        methods[method](_copy_for_load(root, method), state)
    times: dict[str, list[float]] = {method: [] for method in methods}
    # Methods take turns within each repeat, so drift of the disk's speed hits them alike, and each
    # run's files are deleted before the next run: every run writes into the page cache the previous
    # one freed (on this VM a page never used before costs several times more, see the docstring).
    for repeat in range(repeats):
        for method, save in _in_turn(methods, repeat):
            directory = Path(root) / "timed"
            os.sync()  # start every run with no dirty pages of the previous one
            times[method].append(_timed(lambda: save(directory, state)))
            if rank == 0:
                shutil.rmtree(directory)
            dist.barrier()
    peaks: list[int | None] = [None for _ in range(world_size)]
    dist.all_gather_object(peaks, peak_extra)
    if rank == 0:
        nbytes = sum(t.nbytes for r in range(world_size) for t in _leaves(shampoo_state(width, world_size, r, zeros=True)))
        tensors = sum(len(_leaves(shampoo_state(width, world_size, r, zeros=True))) for r in range(world_size))
        Path(results).write_text(json.dumps({"times": times, "peak_extra_bytes": max(p or 0 for p in peaks), "bytes": nbytes, "tensors": tensors}))


def _drop_cache(directory: Path) -> None:
    os.sync()
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def _raw_read(files: list[Path], rank: int, world_size: int) -> None:
    """The disk's limit: this rank's equal share of all the bytes, in sequential reads of up to
    16 MiB into one buffer (a fresh buffer per read would time page faults, not the disk)."""
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    begin, end = total * rank // world_size, total * (rank + 1) // world_size
    buffer = memoryview(bytearray(16 << 20))
    position = 0
    for path, size in zip(files, sizes):
        low, high = max(begin, position), min(end, position + size)
        if low < high:
            fd = os.open(path, os.O_RDONLY)
            try:
                _read_range(fd, low - position, high - low, buffer)
            finally:
                os.close(fd)
        position += size


def _read_range(fd: int, offset: int, length: int, buffer: memoryview[int]) -> None:
    end = offset + length
    while offset < end:
        offset += os.preadv(fd, [buffer[: min(end - offset, buffer.nbytes)]], offset)


def _raw_read_twice(files: list[Path], rank: int, world_size: int) -> None:
    """The raw read, then the same bytes again from the page cache: the floor of a load that
    checks every byte before the template changes, were a rank's bytes one sequential range
    (``_owned_read`` with ``passes=2`` is that floor for the bytes a rank really owns)."""
    _raw_read(files, rank, world_size)
    _raw_read(files, rank, world_size)


def _owned_runs(files: list[Path], state: dict[str, object]) -> list[tuple[Path, list[tuple[int, int]]]]:
    """Per shard file, the runs ``(offset, length)`` of the bytes that hold this rank's tensors,
    from the safetensors headers as any reader finds them (this state's tensors are stored whole
    under their logical names, which ``named_leaves`` gives as the save does); tensors that touch
    form one run."""
    names = {name for name, _ in named_leaves(state)}
    runs = []
    for path in files:
        with open(path, "rb") as file:
            header_bytes = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(header_bytes))
        data = 8 + header_bytes
        merged: list[list[int]] = []
        for begin, end in sorted(tuple(entry["data_offsets"]) for name, entry in header.items() if name in names):
            if merged and data + begin == merged[-1][1]:
                merged[-1][1] = data + end
            else:
                merged.append([data + begin, data + end])
        runs.append((path, [(begin, end - begin) for begin, end in merged]))
    nbytes = sum(length for _, file_runs in runs for _, length in file_runs)
    assert nbytes == sum(t.nbytes for t in _leaves(state)), "the headers do not hold this rank's tensors whole"
    return runs


def _owned_read(runs: list[tuple[Path, list[tuple[int, int]]]], passes: int) -> None:
    """The disk's limit for a load that reads only the bytes this rank owns, scattered as the
    save laid them out: every run asked of the kernel at once (``posix_fadvise(WILLNEED)``), then
    read in order; ``passes=2`` reads them again, from the page cache, the floor of a load that
    checks every byte before it changes the template and holds no second copy of the state."""
    buffer = memoryview(bytearray(16 << 20))
    fds = [os.open(path, os.O_RDONLY) for path, _ in runs]
    try:
        for fd, (_, file_runs) in zip(fds, runs):
            for offset, length in file_runs:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        for _ in range(passes):
            for fd, (_, file_runs) in zip(fds, runs):
                for offset, length in file_runs:
                    _read_range(fd, offset, length, buffer)
    finally:
        for fd in fds:
            os.close(fd)


def bench_load(rank: int, world_size: int, root: str, width: int, repeats: int, results: str) -> None:
    ours, dcp_dir, dcp_hf_dir = (_copy_for_load(root, method) for method in LOADED)
    raw_files = sorted(ours.glob("*.safetensors"))
    owned_runs = _owned_runs(raw_files, shampoo_state(width, world_size, rank, zeros=True))
    methods: dict[str, Callable[[dict[str, object]], object]] = {
        "distributed_shampoo": lambda t: load_checkpoint(ours, t),
        "distributed_shampoo (no verify)": lambda t: load_checkpoint(ours, t, verify=False),
        "raw read": lambda t: _raw_read(raw_files, rank, world_size),
        "raw read, twice": lambda t: _raw_read_twice(raw_files, rank, world_size),
        "owned bytes read": lambda t: _owned_read(owned_runs, passes=1),
        "owned bytes read, twice": lambda t: _owned_read(owned_runs, passes=2),
        "dcp.load": lambda t: dcp.load(t, checkpoint_id=str(dcp_dir)),
        "dcp.load HF": lambda t: dcp.load(t, storage_reader=dcp.HuggingFaceStorageReader(str(dcp_hf_dir))),
    }
    times: dict[str, list[float]] = {method: [] for method in methods}
    for repeat in range(repeats):
        for method, load in _in_turn(methods, repeat):
            template = shampoo_state(width, world_size, rank, zeros=True)
            # Every method starts with none of the three checkpoints cached, not only its own: none
            # runs with another method's files still in the page cache.
            if rank == 0:
                _drop_cache(ours.parent)
            times[method].append(_timed(lambda: load(template)))
            if not method.startswith(("raw read", "owned bytes read")):
                expected = shampoo_state(width, world_size, rank)
                assert all(torch.equal(a, b) for a, b in zip(_leaves(template), _leaves(expected))), method
    if rank == 0:
        Path(results).write_text(json.dumps({"times": times}))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=list(STATES))
    parser.add_argument("--save-ranks", type=int, default=2)
    parser.add_argument("--load-ranks", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write checkpoints (default: the system temp dir)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    report: dict[str, object] = {"save_ranks": args.save_ranks, "load_ranks": args.load_ranks, "repeats": args.repeats}
    for width in args.widths:
        with tempfile.TemporaryDirectory(dir=args.dir) as root:
            save_results, load_results = Path(root) / "save.json", Path(root) / "load.json"
            run_on_ranks(args.save_ranks, bench_save, root, width, args.repeats, str(save_results), timeout_s=1800, collective_timeout_s=900)
            run_on_ranks(args.load_ranks, bench_load, root, width, args.repeats, str(load_results), timeout_s=1800, collective_timeout_s=900)
            saved, loaded = json.loads(save_results.read_text()), json.loads(load_results.read_text())
        report[f"{width}-wide"] = {"save": saved, "load": loaded}
        _print_table(width, args, saved, loaded)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


def _print_table(width: int, args: argparse.Namespace, saved: dict[str, object], loaded: dict[str, object]) -> None:
    nbytes, peak = saved["bytes"], saved["peak_extra_bytes"]
    assert isinstance(nbytes, int) and isinstance(peak, int)
    mib = nbytes / 2**20
    print(f"\n## {width}-wide blocks: {mib:.0f} MiB in {saved['tensors']} tensors")
    print(f"peak extra memory during our save: {peak / 2**20:.1f} MiB (largest tensor {width * width * 4 / 2**20:.1f} MiB)")
    for phase, results, baselines in (
        (f"save on {args.save_ranks} ranks", saved, ("raw write+fsync",)),
        (f"reshard-load on {args.load_ranks} ranks, cold cache", loaded, ("raw read", "owned bytes read, twice")),
    ):
        runs: dict[str, list[float]] = results["times"]  # pyre-ignore[9]: the JSON written above
        times = {m: statistics.median(ts) for m, ts in runs.items()}
        best = {m: min(ts) for m, ts in runs.items()}
        # The best run beside the median: this VM's disk stalls now and then for any method.
        ratios = " | ".join(f"x {b}" for b in baselines)
        best_ratios = " | ".join(f"best x best {b}" for b in baselines)
        print(f"\n| {phase} | median s | MiB/s | {ratios} | best s | {best_ratios} |\n|---|---|---|{'---|' * (2 * len(baselines) + 1)}")
        for method, seconds in times.items():
            ratio = " | ".join(f"{seconds / times[b]:.2f}" for b in baselines)
            best_ratio = " | ".join(f"{best[method] / best[b]:.2f}" for b in baselines)
            print(f"| {method} | {seconds:.3f} | {mib / seconds:.0f} | {ratio} | {best[method]:.3f} | {best_ratio} |")


if __name__ == "__main__":
    main()
