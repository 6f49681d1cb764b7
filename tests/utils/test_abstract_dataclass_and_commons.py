# pyre-strict
import unittest
from abc import ABC, abstractmethod
from dataclasses import dataclass

from parameterized import parameterized

from distributed_shampoo.utils.abstract_dataclass import AbstractDataclass
from distributed_shampoo.utils.commons import batched, get_all_non_abstract_subclasses
from distributed_shampoo.utils.dict_zip_iterator import DictZipIterator


@dataclass(init=False)
class _AbstractConfig(AbstractDataclass):
    @abstractmethod
    def __init__(self) -> None: ...


@dataclass
class _ConcreteConfig(_AbstractConfig):
    learning_rate: float = 0.001

    def __init__(self, learning_rate: float = 0.001) -> None:
        self.learning_rate = learning_rate


class AbstractDataclassTest(unittest.TestCase):
    def test_abstract_classes_cannot_be_instantiated(self) -> None:
        for cls in (AbstractDataclass, _AbstractConfig):
            with self.assertRaisesRegex(TypeError, "Can't instantiate abstract class"):
                cls()  # pyre-ignore[45]: instantiating it is what this test checks.

    def test_concrete_subclass_is_a_dataclass(self) -> None:
        config = _ConcreteConfig(learning_rate=0.5)
        self.assertEqual(config, _ConcreteConfig(0.5))
        self.assertEqual(repr(config), "_ConcreteConfig(learning_rate=0.5)")


class _Base(ABC):
    @abstractmethod
    def f(self) -> None: ...


class _A(_Base):
    def f(self) -> None: ...


class _AbstractMiddle(_Base):
    pass


class _B(_AbstractMiddle):
    def f(self) -> None: ...


class _C(_A, _B):
    pass


class CommonsTest(unittest.TestCase):
    @parameterized.expand(
        [
            ("exact", range(6), 3, [(0, 1, 2), (3, 4, 5)]),
            ("remainder", range(10), 3, [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9,)]),
            ("empty", [], 2, []),
            ("one", "ab", 1, [("a",), ("b",)]),
        ]
    )
    def test_batched(self, _name: str, data: object, n: int, expected: list[tuple[object, ...]]) -> None:
        # pyre-ignore[6]: the parameterized data are iterables.
        self.assertEqual(list(batched(data, n)), expected)

    def test_batched_rejects_non_positive_n(self) -> None:
        with self.assertRaisesRegex(ValueError, "^batched: n=0 must be at least one$"):
            list(batched([1], 0))

    def test_non_abstract_subclasses_at_any_depth_each_once(self) -> None:
        self.assertEqual(list(get_all_non_abstract_subclasses(_Base)), [_A, _C, _B])

    def test_a_concrete_class_is_among_its_own_non_abstract_subclasses(self) -> None:
        self.assertEqual(list(get_all_non_abstract_subclasses(_A)), [_A, _C])
        self.assertEqual(list(get_all_non_abstract_subclasses(_C)), [_C])


class DictZipIteratorTest(unittest.TestCase):
    def test_yields_one_dict_per_step(self) -> None:
        data = {"samples": [1, 2, 3], "labels": "abc"}
        self.assertEqual(
            list(DictZipIterator(data)),
            [{"samples": 1, "labels": "a"}, {"samples": 2, "labels": "b"}, {"samples": 3, "labels": "c"}],
        )

    def test_empty(self) -> None:
        self.assertEqual(list(DictZipIterator({"a": []})), [])
        self.assertEqual(list(DictZipIterator({})), [])

    def test_different_lengths_raise_naming_keys(self) -> None:
        iterator = DictZipIterator({"samples": [1, 2, 3], "labels": [1, 2]})
        self.assertEqual(next(iterator), {"samples": 1, "labels": 1})
        self.assertEqual(next(iterator), {"samples": 2, "labels": 2})
        with self.assertRaisesRegex(
            ValueError,
            r"^Iterators have different lengths\. Exhausted: \['labels'\], Still active: \['samples'\] \(after 2 items",
        ):
            next(iterator)
