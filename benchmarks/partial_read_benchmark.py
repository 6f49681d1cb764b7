# pyre-strict
"""The cost of verifying partial reads: a Shard(0) DTensor state saved on 2 ranks, loaded on 3.

Each loading rank needs part of one or two saved chunks; with ``verify=True`` it checks the 1 MiB
pages it touches before copying. Compared in one run with ``verify=False`` and with a raw read of
the rank's share of the bytes, with a cold page cache (as ``checkpoint_benchmark``).

    python -m benchmarks.partial_read_benchmark --mib 256 --repeats 5
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor, Shard

from benchmarks.checkpoint_benchmark import _drop_cache, _in_turn, _raw_read, _timed
from distributed_shampoo.checkpoint import load_checkpoint, save_checkpoint
from distributed_shampoo.launch import run_on_ranks

_COLS = 1024


def _tensors(mib: int) -> dict[str, torch.Tensor]:
    """Eight float32 tensors of ``mib / 8`` MiB each, with distinct values."""
    rows = (mib << 20) // (8 * _COLS * 4)
    return {f"w{i}": torch.arange(rows * _COLS, dtype=torch.float32).reshape(rows, _COLS) + i for i in range(8)}


def _save(rank: int, world_size: int, directory: str, mib: int) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    save_checkpoint(directory, {name: distribute_tensor(t, mesh, [Shard(0)]) for name, t in _tensors(mib).items()})


def _load(rank: int, world_size: int, directory: str, mib: int, repeats: int, results: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    full = _tensors(mib)
    template = {name: distribute_tensor(torch.zeros_like(t), mesh, [Shard(0)]) for name, t in full.items()}
    files = sorted(Path(directory).glob("*.safetensors"))
    methods = {
        "load, verify=True (pages)": lambda: load_checkpoint(directory, template),
        "load, verify=False": lambda: load_checkpoint(directory, template, verify=False),
        "raw read of the same share": lambda: _raw_read(files, rank, world_size),
    }
    times: dict[str, list[float]] = {method: [] for method in methods}
    for repeat in range(repeats):
        for method, load in _in_turn(methods, repeat):
            if rank == 0:
                _drop_cache(Path(directory))
            times[method].append(_timed(load))
    for name, tensor in full.items():
        assert torch.equal(template[name].full_tensor(), tensor), name
    if rank == 0:
        medians = {method: statistics.median(values) for method, values in times.items()}
        lines = [f"| {method} | {seconds:.3f} | {mib / seconds:.0f} | {seconds / medians['raw read of the same share']:.2f} |"
                 for method, seconds in medians.items()]
        Path(results).write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        directory, results = str(Path(root, "ckpt")), str(Path(root, "results.md"))
        run_on_ranks(2, _save, directory, args.mib, timeout_s=1800)
        run_on_ranks(3, _load, directory, args.mib, args.repeats, results, timeout_s=1800)
        print(f"## Shard(0) state of {args.mib} MiB saved on 2 ranks, loaded on 3 (cold cache), median of {args.repeats}")
        print("\n| method | median s | MiB/s | x raw read |\n|---|---:|---:|---:|")
        print(Path(results).read_text())


if __name__ == "__main__":
    main()
