# pyre-strict
"""Pauses Python's cyclic garbage collector for the duration of a save or load.

A save or load allocates a few small objects per tensor (names, layouts, read requests, parsed
JSON), and each burst of allocations makes the collector scan the whole heap of the process,
the caller's model and state included, again and again. Reference counting still frees
everything meanwhile; only the cycle detector waits. ``docs/benchmarks.md`` (run D) measures what
it saves on a 6,398-tensor state. What is still alive when the collector resumes is scanned then,
so the pause covers a whole function, whose locals are gone by then (run P).
"""

import functools
import gc
from collections.abc import Callable
from typing import ParamSpec, TypeVar

_Params = ParamSpec("_Params")
_Result = TypeVar("_Result")


def gc_paused(function: Callable[_Params, _Result]) -> Callable[_Params, _Result]:
    """``function`` with the cyclic collector disabled while it runs, if it was enabled (so nesting
    is fine). The collector resumes only once ``function`` has returned, when the objects its
    locals held (a load's plan, a save's leaves) are freed already and so are not scanned."""

    @functools.wraps(function)
    def paused(*args: _Params.args, **kwargs: _Params.kwargs) -> _Result:
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return paused
