# pyre-strict
"""A base for configuration dataclasses that must not be instantiated themselves."""

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(init=False)
class AbstractDataclass(ABC):
    """Base of abstract configuration dataclasses.

    Subclasses that still declare an abstract ``__init__`` are abstract: instantiating them raises
    ``TypeError``. A concrete subclass is a ``@dataclass`` that defines (or lets ``dataclass``
    generate) its own ``__init__``.
    """

    @abstractmethod
    def __init__(self) -> None:
        """Abstract: concrete configurations define their own constructor."""
