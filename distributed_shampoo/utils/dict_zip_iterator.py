# pyre-strict
"""Iterates several equally long iterables together, yielding one dict per step."""

from collections.abc import Iterable, Iterator, Mapping
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class DictZipIterator(Generic[K, V], Iterator[dict[K, V]]):
    """Yields ``{key: next(iterable) for key, iterable in data.items()}`` until all are exhausted.

    Args:
        data: Named iterables that must all have the same length.

    Raises (while iterating):
        ValueError: If one iterable is exhausted before the others; names the keys involved.
    """

    def __init__(self, data: Mapping[K, Iterable[V]]) -> None:
        self._iterators: dict[K, Iterator[V]] = {key: iter(value) for key, value in data.items()}
        self._position = 0

    def __iter__(self) -> "DictZipIterator[K, V]":
        return self

    def __next__(self) -> dict[K, V]:
        sentinel = object()
        values = {key: next(iterator, sentinel) for key, iterator in self._iterators.items()}
        exhausted = [key for key, value in values.items() if value is sentinel]
        if len(exhausted) == len(values):  # all ended together (or there are no iterables)
            raise StopIteration
        if not exhausted:
            self._position += 1
            # pyre-ignore[7]: the sentinel was ruled out above, so every value is a V.
            return values
        remaining = [key for key in values if key not in exhausted]
        raise ValueError(
            f"Iterators have different lengths. Exhausted: {exhausted}, Still active: {remaining} "
            f"(after {self._position} items; all iterables must have the same length)"
        )
