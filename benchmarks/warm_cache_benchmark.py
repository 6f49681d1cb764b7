# pyre-strict
"""The CPU cost of our save and load, without the disk: one process, one thread, warm page cache.

The 512-wide block state of ``checkpoint_benchmark`` (456 MiB, 798 tensors) is saved and loaded
into a template ``--repeats`` times; the medians isolate what the library's own work costs
(planning, parsing, checksums, copies), which the disk's noise hides in ``checkpoint_benchmark``.
Run it in two checkouts to compare two versions of the library.

    python -m benchmarks.warm_cache_benchmark --repeats 7
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.checkpoint_benchmark import shampoo_state
from distributed_shampoo.checkpoint import load_checkpoint, read_checkpoint_index, save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = shampoo_state(args.width, 1, 0)
    template = shampoo_state(args.width, 1, 0, zeros=True)
    times: dict[str, list[float]] = {"save": [], "load, verify=True": [], "load, verify=False": [], "read the index": []}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            directory = Path(root, f"ckpt-{repeat}")
            start = time.perf_counter()
            save_checkpoint(directory, state)
            times["save"].append(time.perf_counter() - start)
            for verify in (True, False):
                start = time.perf_counter()
                load_checkpoint(directory, template, verify=verify)
                times[f"load, verify={verify}"].append(time.perf_counter() - start)
            start = time.perf_counter()
            read_checkpoint_index(directory)
            times["read the index"].append(time.perf_counter() - start)
    print(f"| {args.width}-wide state, warm cache, 1 thread | median ms |\n|---|---:|")
    for what, values in times.items():
        print(f"| {what} | {statistics.median(values) * 1000:.1f} |")


if __name__ == "__main__":
    main()
