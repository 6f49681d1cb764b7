# pyre-strict
"""Pauses Python's cyclic garbage collector for the duration of a save or load.

A save or load allocates a few small objects per tensor (names, layouts, read requests, parsed
JSON), and each burst of allocations makes the collector scan the whole heap of the process,
the caller's model and state included, again and again. Reference counting still frees
everything meanwhile; only the cycle detector waits. ``docs/benchmarks.md`` (run D) measures what
it saves on a 6,398-tensor state. What the block still holds when it ends is scanned once the
collector resumes, so a block frees its per-tensor objects before it ends (run P).
"""

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disables the cyclic collector inside the block, if it was enabled (so nesting is fine)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
