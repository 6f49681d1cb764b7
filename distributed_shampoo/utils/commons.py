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
        raise ValueError(f"batched: n must be at least 1, got {n}")
    iterator = iter(iterable)
    while batch := tuple(islice(iterator, n)):
        yield batch


def get_all_non_abstract_subclasses(cls: type[T]) -> Iterator[type[T]]:
    """Yields every non-abstract class deriving from ``cls`` (at any depth), each once.

    ``cls`` itself is not yielded. Order: depth first, in definition order of subclasses.
    """
    seen: set[type[T]] = set()

    def visit(parent: type[T]) -> Iterator[type[T]]:
        for subclass in parent.__subclasses__():
            if subclass in seen:
                continue
            seen.add(subclass)
            if not inspect.isabstract(subclass):
                yield subclass
            yield from visit(subclass)

    yield from visit(cls)
