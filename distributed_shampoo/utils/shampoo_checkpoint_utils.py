# pyre-strict
"""Flattening nested state dicts to JSON-list keys, and loading nested state in place."""

import json
from collections.abc import Mapping, Sequence

import torch

from distributed_shampoo.utils.optimizer_modules import OptimizerModule

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


def flatten(input_dict: Mapping[Key, object]) -> dict[str, object]:
    """Flattens nested dicts into one dict keyed by JSON-list paths.

    Every value that is not a dict is a leaf (lists stay leaves); empty dicts disappear.

    Example: ``{"model": {"w": t}}`` -> ``{'["model", "w"]': t}``.

    Raises:
        TypeError: If a key is neither ``str`` nor ``int``.
    """
    output: dict[str, object] = {}

    def visit(node: Mapping[Key, object], path: list[Key]) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                visit(value, path + [key])
            else:
                output[encode_key(path + [key])] = value

    visit(input_dict, [])
    return output


def unflatten(flattened_dict: Mapping[str, object]) -> dict[Key, object]:
    """Inverts ``flatten``: JSON-list keys become nested dicts (integer keys stay integers).

    Raises:
        ValueError: If a key is not a JSON list, or two keys conflict (one is a prefix of the
            other, so a value would have to be both a leaf and a dict).
    """
    output: dict[Key, object] = {}
    for key, value in flattened_dict.items():
        path = decode_key(key)
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
    current_param_state_dict: dict[Key, object],
    param_state_dict_to_load: Mapping[Key, object],
    enable_missing_key_check: bool = True,
) -> None:
    """Loads nested state into ``current_param_state_dict`` in place.

    Tensors are copied into the existing tensors (identity preserved), ``OptimizerModule``s load
    their state dicts, nested dicts recurse, and other values are replaced.

    Args:
        current_param_state_dict: The state to update.
        param_state_dict_to_load: The state to load; keys it has beyond the current state are
            ignored.
        enable_missing_key_check: Raise when a key of the current state is missing from the state
            to load; when false such keys keep their current value.

    Raises:
        KeyError: A key is missing (with the check enabled); names its path.
        ValueError: A tensor's shape differs, or a tensor is replaced by a non-tensor.
    """
    _update(current_param_state_dict, param_state_dict_to_load, enable_missing_key_check, [])


def _update(
    current: dict[Key, object],
    to_load: Mapping[Key, object],
    check_missing: bool,
    path: list[Key],
) -> None:
    for key, value in current.items():
        if key not in to_load:
            if check_missing:
                raise KeyError(f"update_param_state_dict_object: missing key {encode_key(path + [key])}")
            continue
        loaded = to_load[key]
        if isinstance(value, torch.Tensor):
            if not isinstance(loaded, torch.Tensor) or loaded.shape != value.shape:
                got = tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else type(loaded).__name__
                raise ValueError(
                    f"update_param_state_dict_object: {encode_key(path + [key])} expects a tensor of "
                    f"shape {tuple(value.shape)}, got {got}"
                )
            with torch.no_grad():
                value.copy_(loaded)
        elif isinstance(value, OptimizerModule):
            if not isinstance(loaded, Mapping):
                raise ValueError(f"update_param_state_dict_object: {encode_key(path + [key])} expects a dict")
            value.load_state_dict(loaded)
        elif isinstance(value, dict):
            if not isinstance(loaded, Mapping):
                raise ValueError(f"update_param_state_dict_object: {encode_key(path + [key])} expects a dict")
            _update(value, loaded, check_missing, path + [key])
        else:
            current[key] = loaded
