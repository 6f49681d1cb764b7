# pyre-strict
"""Flattening nested state dicts to JSON-list keys, and loading nested state in place."""

import json
import logging
from collections.abc import Mapping, Sequence
from copy import deepcopy
from typing import TypeVar

import torch

from distributed_shampoo.utils.optimizer_modules import OptimizerModule

logger: logging.Logger = logging.getLogger(__name__)

# A key of a nested dict: dicts in state dicts are keyed by str (names) or int (indices).
Key = str | int


def encode_key(path: Sequence[Key]) -> str:
    """Encodes a key path as a JSON list, e.g. ``["model", "layer1", 0]``.

    Raises:
        TypeError: If a component is neither ``str`` nor ``int`` (``bool`` is rejected too: it
            would come back as a JSON ``true``, not as the key it was).
    """
    for component in path:
        if isinstance(component, bool) or not isinstance(component, (str, int)):
            raise TypeError(
                f"state dict keys must be str or int, got {component!r} "
                f"({type(component).__name__}) in {list(path)!r}"
            )
    return json.dumps(list(path))


def decode_key(key: str) -> list[Key]:
    """Decodes a key made by ``encode_key``; integers come back as ``int``.

    Raises:
        ValueError: If ``key`` is not a JSON list of strings and integers.
    """
    try:
        path = json.loads(key)
    except json.JSONDecodeError as error:
        raise ValueError(f"not a JSON-list key: {key!r} ({error})") from None
    if not isinstance(path, list) or any(
        isinstance(c, bool) or not isinstance(c, (str, int)) for c in path
    ):
        raise ValueError(f"not a JSON list of str and int: {key!r}")
    return path


# A key ``flatten`` accepts: any JSON scalar (the reference's keys include floats, bools, None).
FlatKey = str | int | float | bool | None
_K = TypeVar("_K", bound=FlatKey)
_L = TypeVar("_L", bound=FlatKey)
_FLAT_KEY_TYPES: tuple[type[object], ...] = (str, int, float, bool, type(None))


def param_key_path(path: Sequence[Key]) -> tuple[Key, ...] | None:
    """The key path up to the parameter name that follows the first ``"state"`` key (the
    ``torch.optim`` state-dict convention), or None: ``["optimizer", "state", "fc.weight",
    "block_0"]`` -> ``("optimizer", "state", "fc.weight")``."""
    for position, key in enumerate(path[:-1]):
        if key == "state":
            return tuple(path[: position + 2])
    return None


def flatten(input_dict: Mapping[_K, object]) -> dict[str, object]:
    """Flattens nested dicts into one dict keyed by JSON-list paths (``json.dumps`` of the path).

    Every value that is not a dict is a leaf (lists stay leaves); empty dicts disappear. Keys may
    be any JSON scalar: ``{0.1: {True: {None: t}}}`` -> ``{'[0.1, true, null]': t}``.

    Raises:
        TypeError: If a key is not a JSON scalar (str, int, float, bool, None).
    """
    output: dict[str, object] = {}

    def visit(node: Mapping[_K, object], path: list[FlatKey]) -> None:
        for key, value in node.items():
            if not isinstance(key, _FLAT_KEY_TYPES):
                raise TypeError(
                    f"flatten: keys must be JSON scalars (str, int, float, bool, None), got {key!r} "
                    f"({type(key).__name__}) in {path!r}"
                )
            if isinstance(value, Mapping):
                visit(value, path + [key])
            else:
                output[json.dumps(path + [key])] = value

    visit(input_dict, [])
    return output


def unflatten(flattened_dict: Mapping[str, object]) -> dict[FlatKey, object]:
    """Inverts ``flatten``: JSON-list keys become nested dicts (each key its JSON scalar: an
    integer stays an int, ``true`` a bool, ``null`` None).

    Raises:
        ValueError: If a key is not a JSON list of scalars, or two keys conflict (one is a prefix
            of the other, so a value would have to be both a leaf and a dict).
    """
    output: dict[FlatKey, object] = {}
    for key, value in flattened_dict.items():
        try:
            path = json.loads(key)
        except json.JSONDecodeError as error:
            raise ValueError(f"unflatten: not a JSON-list key: {key!r} ({error})") from None
        if not isinstance(path, list) or not all(isinstance(c, _FLAT_KEY_TYPES) for c in path):
            raise ValueError(f"unflatten: not a JSON list of scalars: {key!r}")
        if not path:
            raise ValueError(f"unflatten: empty key path {key!r}")
        node = output
        for component in path[:-1]:
            child = node.setdefault(component, {})
            if not isinstance(child, dict):
                raise ValueError(f"unflatten: {key!r} conflicts with a leaf at {component!r}")
            node = child
        if path[-1] in node:
            raise ValueError(f"unflatten: {key!r} conflicts with another key")
        node[path[-1]] = value
    return output


def extract_state_dict_content(input_dict: Mapping[Key, object]) -> dict[Key, object]:
    """Returns a copy of nested dicts in which every ``OptimizerModule`` is its ``state_dict()``.

    Tensors and other leaves are kept as they are (not copied).
    """
    return {
        key: extract_state_dict_content(value)
        if isinstance(value, Mapping)
        else value.state_dict()
        if isinstance(value, OptimizerModule)
        else value
        for key, value in input_dict.items()
    }


def update_param_state_dict_object(
    current_param_state_dict: Mapping[_K, object],
    param_state_dict_to_load: Mapping[_L, object],
    enable_missing_key_check: bool = True,
) -> None:
    """Loads nested state into ``current_param_state_dict`` in place.

    Tensors are copied into the existing tensors (identity preserved); nested dicts and
    ``OptimizerModule``s (through their ``state_dict(keep_vars=True)``) recurse; other values are
    replaced by deep copies of the loaded ones.

    Args:
        current_param_state_dict: The state to update.
        param_state_dict_to_load: The state to load; keys it has beyond the current state are
            ignored.
        enable_missing_key_check: Raise when a key of the current state is missing from the state
            to load; when false such keys keep their current value (with a warning).

    Raises:
        KeyError: A key is missing (with the check enabled): "Key <key> not found in state dict to
            load." and its path.
        ValueError: A tensor's shape differs, or a tensor or dict is given something else.
    """
    _update(current_param_state_dict, param_state_dict_to_load, enable_missing_key_check, [])


def _update(
    current: Mapping[_K, object],
    to_load: Mapping[_L, object],
    check_missing: bool,
    path: list[FlatKey],
) -> None:
    for key, value in list(current.items()):
        where = json.dumps(path + [key], default=repr)
        if key not in to_load:
            if check_missing:
                raise KeyError(f"Key {key} not found in state dict to load. (at {where})")
            logger.warning(f"Key {key} not found in state dict to load. (at {where})")
            continue
        loaded = to_load[key]  # pyre-ignore[6]: the key was found in it just above
        if isinstance(value, torch.Tensor):
            if not isinstance(loaded, torch.Tensor) or loaded.shape != value.shape:
                got = tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else type(loaded).__name__
                raise ValueError(
                    f"update_param_state_dict_object: {where} expects a tensor of shape {tuple(value.shape)}, got {got}"
                )
            with torch.no_grad():
                value.copy_(loaded)
        elif isinstance(value, (dict, OptimizerModule)):
            if not isinstance(loaded, Mapping):
                raise ValueError(f"update_param_state_dict_object: {where} expects a dict, got {type(loaded).__name__}")
            nested = value.state_dict(keep_vars=True) if isinstance(value, OptimizerModule) else value
            _update(nested, loaded, check_missing, path + [key])
        else:
            current[key] = deepcopy(loaded)  # pyre-ignore[16]: the state dicts to update are dicts
