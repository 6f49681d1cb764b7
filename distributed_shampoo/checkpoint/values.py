# pyre-strict
"""The non-tensor values a checkpoint holds, as JSON: scalars, torch dtypes, and this package's
frozen config dataclasses (what the reference's ``distributed_state_dict()`` puts in its
``param_groups``), without pickling.

- a finite float, an int, bool, str or None: itself;
- a non-finite float: ``{"float": "inf" | "-inf" | "nan"}`` (JSON has no literal for them);
- a torch dtype: ``{"dtype": "float32"}`` (the dtypes safetensors stores);
- a config: ``{"config": "<class name>", "fields": {<field>: <value>, ...}}``, every field of
  the dataclass, each value in this form (reading, a field with a default may be absent: one
  added to the class since the file was written).

Types are resolved by name against ``CONFIG_TYPES`` and ``DTYPES`` only: nothing named in a file
is imported or unpickled, and a decoded config is built by its class, so its own validation runs.
"""

import dataclasses
import math
import types
import typing
from collections.abc import Callable

import torch

from distributed_shampoo.shampoo_types import CONFIG_CLASSES

# The config classes a checkpoint may hold, by class name.
CONFIG_TYPES: dict[str, type[object]] = {cls.__name__: cls for cls in CONFIG_CLASSES}
# The dtypes a checkpoint may hold as values, by name.
DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
        torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}
_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
_FLOAT_WORDS: tuple[str, ...] = ("inf", "-inf", "nan")
# Configs nest configs at most this deep (a hostile file cannot make decoding recurse further).
_MAX_DEPTH: int = 8

SCALAR_TYPES: tuple[type[object], ...] = (bool, int, float, str, type(None))


def is_value(node: object) -> bool:
    """Whether ``node`` is a leaf a checkpoint stores in the index: a scalar, a dtype, a config."""
    return isinstance(node, SCALAR_TYPES) or (isinstance(node, torch.dtype) and node in _DTYPE_NAMES) or _is_config(node)


def _is_config(value: object) -> bool:
    return CONFIG_TYPES.get(type(value).__name__) is type(value)


def encode_value(value: object) -> object:
    """The JSON form of a value leaf (``is_value``); anything else is returned as it is (an
    already encoded value stays the same)."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": str(value)}
    if isinstance(value, torch.dtype):  # one of ``DTYPES`` (``is_value``)
        return {"dtype": _DTYPE_NAMES[value]}
    if _is_config(value):
        return {
            "config": type(value).__name__,
            "fields": {field.name: encode_value(getattr(value, field.name)) for field in dataclasses.fields(value)},
        }
    return value


def decode_value(raw: object, fail: Callable[[str], Exception], depth: int = 0) -> object:
    """The value ``encode_value`` made ``raw`` from.

    Args:
        raw: The parsed JSON.
        fail: Makes the error to raise, from what is wrong (the caller names file and key).

    Raises:
        What ``fail`` makes: not one of the forms above, an unknown type or dtype, other fields
            than the class has, a field of the wrong type, or a value the class refuses.
    """
    if isinstance(raw, SCALAR_TYPES):
        return raw
    if not isinstance(raw, dict):
        raise fail(f"expected a JSON scalar or a typed value, got {type(raw).__name__}")
    if list(raw) == ["float"] and raw["float"] in _FLOAT_WORDS:
        return float(str(raw["float"]))
    if list(raw) == ["dtype"] and isinstance(raw["dtype"], str) and raw["dtype"] in DTYPES:
        return DTYPES[raw["dtype"]]
    if sorted(raw) == ["config", "fields"]:
        return _decode_config(raw["config"], raw["fields"], fail, depth)
    raise fail('expected a JSON scalar, {"float": ...}, {"dtype": ...} or {"config": ..., "fields": ...}')


def _decode_config(type_name: object, raw_fields: object, fail: Callable[[str], Exception], depth: int) -> object:
    if not isinstance(type_name, str) or type_name not in CONFIG_TYPES:
        raise fail(f"unknown config type {str(type_name)[:80]!r} (this library reads {sorted(CONFIG_TYPES)})")
    if depth >= _MAX_DEPTH:
        raise fail(f"configs nested deeper than {_MAX_DEPTH}")
    cls = CONFIG_TYPES[type_name]
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = [field.name for field in fields]
    # A field added since the file was written is absent from it and takes its default.
    required = {field.name for field in fields if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING}
    if not isinstance(raw_fields, dict) or not required <= set(raw_fields) or not set(raw_fields) <= set(names):
        got = sorted(raw_fields) if isinstance(raw_fields, dict) else type(raw_fields).__name__
        raise fail(f"{type_name} has the fields {names}, got {got}")
    values: dict[str, object] = {}
    for name in (name for name in names if name in raw_fields):
        value = decode_value(raw_fields[name], lambda problem: fail(f"{type_name}.{name}: {problem}"), depth + 1)
        if not _matches(value, hints[name]):
            raise fail(f"{type_name}.{name}: expected {hints[name]}, got {value!r}")
        values[name] = float(value) if hints[name] is float else value  # pyre-ignore[6]: checked
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise fail(f"{type_name} refuses its saved fields: {error}") from None


def _matches(value: object, annotation: object) -> bool:
    """Whether ``value`` has the type a config field is annotated with."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_matches(value, option) for option in typing.get_args(annotation))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation in (int, str, bool):
        return type(value) is annotation
    if annotation is type(None):
        return value is None
    return isinstance(annotation, type) and isinstance(value, annotation)
