# pyre-strict
"""The non-tensor values a checkpoint holds, as JSON: scalars, torch dtypes, and this package's
frozen config dataclasses (what the reference's ``distributed_state_dict()`` puts in its
``param_groups``), without pickling.

- a finite float, an int, bool, str or None: itself;
- a non-finite float: ``{"float": "inf" | "-inf" | "nan"}`` (JSON has no literal for them);
- a torch dtype: ``{"dtype": "float32"}`` (the dtypes safetensors stores);
- an enum member: ``{"enum": "<class name>", "name": "<member name>"}``;
- a config: ``{"config": "<class name>", "fields": {<field>: <value>, ...}}``, the dataclass's
  fields, each value in this form; within a config a mapping field is ``{"mapping": [[key,
  value], ...]}`` (its int keys kept) and a sequence a JSON list (read back as a list, or a tuple
  where the field is annotated ``tuple``). A field holding a function (``scale_fn``) is saved only
  when it holds the field's default, and then is left out: a checkpoint holds no code. Reading,
  a field with a default may be absent (one added to the class since the file was written, or a
  default function, or a field marked ``metadata={"saved": False}``, a live object such as a device
  mesh) and takes its default.

Types are resolved by name against ``CONFIG_TYPES`` and ``DTYPES`` only: nothing named in a file
is imported or unpickled, and a decoded config is built by its class, so its own validation runs.
"""

import collections.abc
import dataclasses
import enum
import math
import types
import typing
from collections.abc import Callable, Mapping

import torch

from distributed_shampoo.checkpoint.errors import UnsupportedValueError
from distributed_shampoo.shampoo_types import CONFIG_CLASSES, CONFIG_KINDS, ENUM_CLASSES

# The config classes a checkpoint may hold, by class name.
CONFIG_TYPES: dict[str, type[object]] = {cls.__name__: cls for cls in CONFIG_CLASSES}
# The enums a checkpoint may hold, by class name.
ENUM_TYPES: dict[str, type[enum.Enum]] = {cls.__name__: cls for cls in ENUM_CLASSES}
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
    return (
        isinstance(node, SCALAR_TYPES)
        or (isinstance(node, torch.dtype) and node in _DTYPE_NAMES)
        or _is_config(node)
        or _is_enum(node)
    )


def _is_config(value: object) -> bool:
    return CONFIG_TYPES.get(type(value).__name__) is type(value)


def _is_enum(value: object) -> bool:
    return ENUM_TYPES.get(type(value).__name__) is type(value)


def same_config_kind(saved: object, template: object) -> bool:
    """Whether ``saved`` and ``template`` are configs of one kind (``CONFIG_KINDS``), so that the
    one can replace the other in a load."""
    if not (_is_config(saved) and _is_config(template)):
        return False
    return any(isinstance(saved, kind) and isinstance(template, kind) for kind in CONFIG_KINDS)


def encode_value(value: object) -> object:
    """The JSON form of a value leaf (``is_value``); anything else is returned as it is (an
    already encoded value stays the same).

    Raises:
        UnsupportedValueError: A config field holds a function other than its default.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": str(value)}
    if isinstance(value, torch.dtype):  # one of ``DTYPES`` (``is_value``)
        return {"dtype": _DTYPE_NAMES[value]}
    if _is_config(value):
        return {"config": type(value).__name__, "fields": _encode_fields(value)}
    if isinstance(value, enum.Enum) and _is_enum(value):
        return {"enum": type(value).__name__, "name": value.name}
    return value


def _encode_fields(config: object) -> dict[str, object]:
    fields: dict[str, object] = {}
    for field in dataclasses.fields(config):
        if field.metadata.get("saved", True) is False:
            continue  # a live object (a device mesh): reading takes the default
        value = getattr(config, field.name)
        if callable(value) and not _is_config(value):
            if value is not field.default:
                raise UnsupportedValueError(
                    f"{type(config).__name__}.{field.name} holds the function {getattr(value, '__qualname__', value)!r}: "
                    "a checkpoint holds no code, so only the field's default function can be saved "
                    "(save_param_groups=False leaves the configs out)"
                )
            continue  # the default: reading takes it again
        fields[field.name] = _encode_field_value(value)
    return fields


def _encode_field_value(value: object) -> object:
    if isinstance(value, Mapping):
        return {"mapping": [[_encode_field_value(key), _encode_field_value(item)] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_encode_field_value(item) for item in value]
    return encode_value(value)


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
    if sorted(raw) == ["enum", "name"]:
        cls = ENUM_TYPES.get(raw["enum"]) if isinstance(raw["enum"], str) else None
        if cls is None or not isinstance(raw["name"], str) or raw["name"] not in cls.__members__:
            raise fail(f"unknown enum member {str(raw['enum'])[:80]}.{str(raw['name'])[:80]} (this library reads {sorted(ENUM_TYPES)})")
        return cls[raw["name"]]
    raise fail('expected a JSON scalar, {"float": ...}, {"dtype": ...}, {"enum": ..., "name": ...} or {"config": ..., "fields": ...}')


def _decode_field_value(raw: object, fail: Callable[[str], Exception], depth: int) -> object:
    """A config field's value: what ``decode_value`` reads, or a mapping or a list of them."""
    if depth >= _MAX_DEPTH:
        raise fail(f"configs nested deeper than {_MAX_DEPTH}")
    if isinstance(raw, list):
        return [_decode_field_value(item, fail, depth + 1) for item in raw]
    if isinstance(raw, dict) and list(raw) == ["mapping"]:
        pairs = raw["mapping"]
        if not isinstance(pairs, list) or not all(isinstance(pair, list) and len(pair) == 2 for pair in pairs):
            raise fail('expected {"mapping": [[key, value], ...]}')
        decoded = {}
        for key, item in pairs:
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise fail(f"a mapping key must be a str or an int, got {key!r}")
            if key in decoded:
                raise fail(f"the mapping key {key!r} appears twice")
            decoded[key] = _decode_field_value(item, fail, depth + 1)
        return decoded
    return decode_value(raw, fail, depth)


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
        value = _decode_field_value(raw_fields[name], lambda problem: fail(f"{type_name}.{name}: {problem}"), depth + 1)
        conformed = _conform(value, hints[name])
        if conformed is _MISMATCH:
            raise fail(f"{type_name}.{name}: expected {hints[name]}, got {value!r}")
        values[name] = conformed
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise fail(f"{type_name} refuses its saved fields: {error}") from None


# What ``_conform`` returns for a value that does not have the annotated type.
_MISMATCH = object()


def _conform(value: object, annotation: object) -> object:
    """``value`` in the type a config field is annotated with (an int becomes a float where a
    float is expected, a list a tuple where a tuple is), or ``_MISMATCH``."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or origin is typing.Union:
        for option in arguments:
            conformed = _conform(value, option)
            if conformed is not _MISMATCH:
                return conformed
        return _MISMATCH
    if origin in (collections.abc.Mapping, dict):
        if not isinstance(value, dict):
            return _MISMATCH
        pairs = [(_conform(key, arguments[0]), _conform(item, arguments[1])) for key, item in value.items()]
        return _MISMATCH if any(part is _MISMATCH for pair in pairs for part in pair) else dict(pairs)
    if origin in (collections.abc.Sequence, list, tuple):
        if not isinstance(value, list):
            return _MISMATCH
        if origin is tuple and not (len(arguments) == 2 and arguments[1] is Ellipsis):
            item_types = list(arguments) if len(arguments) == len(value) else None
        else:
            item_types = [arguments[0]] * len(value)
        if item_types is None:
            return _MISMATCH
        items = [_conform(item, item_type) for item, item_type in zip(value, item_types)]
        if any(item is _MISMATCH for item in items):
            return _MISMATCH
        return tuple(items) if origin is tuple else items
    if annotation is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _MISMATCH
    if annotation in (int, str, bool):
        return value if type(value) is annotation else _MISMATCH
    if annotation is type(None):
        return value if value is None else _MISMATCH
    return value if isinstance(annotation, type) and isinstance(value, annotation) else _MISMATCH
