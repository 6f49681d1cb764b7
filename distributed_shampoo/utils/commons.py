# pyre-strict
"""General helpers: batching an iterable and discovering concrete subclasses."""

import inspect
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

T = TypeVar("T")


def batched(iterable: Iterable[T], n: int) -> Iterator[tuple[T, ...]]:
    """Yields consecutive tuples of ``n`` items; the last one may be shorter.

    Args:
        iterable: The items to batch.
        n: The batch size, at least 1.

    Raises:
        ValueError: If ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"batched: {n=} must be at least one")
    iterator = iter(iterable)
    while batch := tuple(islice(iterator, n)):
        yield batch


def get_all_non_abstract_subclasses(cls: type[T]) -> Iterator[type[T]]:
    """Yields every non-abstract class among ``cls`` and the classes deriving from it (at any
    depth), each once: ``cls`` itself first when it is concrete, then depth first in definition
    order of subclasses (as in the reference, which returns them unordered)."""
    seen: set[type[T]] = {cls}

    def visit(parent: type[T]) -> Iterator[type[T]]:
        if not inspect.isabstract(parent):
            yield parent
        for subclass in parent.__subclasses__():
            if subclass not in seen:
                seen.add(subclass)
                yield from visit(subclass)

    yield from visit(cls)
