# Minimal type stub: `parameterized` ships no type information.
from typing import Any, Callable, Iterable

class parameterized:
    @staticmethod
    def expand(
        input: Iterable[Any], name_func: Callable[..., str] | None = ..., skip_on_empty: bool = ...
    ) -> Callable[[Callable[..., None]], Callable[..., None]]: ...

def parameterized_class(
    attrs: str | Iterable[str] | Iterable[dict[str, Any]],
    input_values: Iterable[Iterable[Any]] | None = ...,
    class_name_func: Callable[..., str] | None = ...,
) -> Callable[[type[Any]], type[Any]]: ...
