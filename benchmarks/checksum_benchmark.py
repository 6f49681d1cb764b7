# pyre-strict
"""Single-core hashing speed of the checksum candidates, against the disk's speed.

    python -m benchmarks.checksum_benchmark

Justifies the ``xxhash`` dependency: the index's checksums use xxh3_64.
"""

import os
import time
import zlib
from collections.abc import Callable

import xxhash

from distributed_shampoo.checkpoint.format import checksum

_MIB: int = 256


def _gib_per_s(fn: Callable[[bytes], object], data: bytes) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn(data)
        best = min(best, time.perf_counter() - start)
    return len(data) / best / 2**30


def main() -> None:
    data = os.urandom(_MIB << 20)
    candidates: dict[str, Callable[[bytes], object]] = {
        "xxh3_64 (the format's checksum)": checksum,
        "xxh64": xxhash.xxh64_hexdigest,
        "zlib.crc32": zlib.crc32,
    }
    print(f"| hash, one core, {_MIB} MiB | GiB/s |\n|---|---|")
    for name, fn in candidates.items():
        print(f"| {name} | {_gib_per_s(fn, data):.1f} |")


if __name__ == "__main__":
    main()
