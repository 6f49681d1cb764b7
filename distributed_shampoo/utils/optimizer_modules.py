# pyre-strict
"""``OptimizerModule``: an ``nn.Module``-like base whose tensors form a recursive state dict."""

from collections.abc import Mapping

import torch

# A state-dict value: a tensor, a plain value, or a nested dict of them.
StateValue = object

_SCALAR_TYPES: tuple[type[object], ...] = (bool, int, float, str, type(None))


class OptimizerModule:
    """Base class of stateful optimizer components.

    The state of a module is every instance attribute that is (or contains) a tensor: tensors,
    nested ``OptimizerModule``s, and lists, tuples and dicts of those. Lists and tuples appear in the
    state dict as dicts keyed by their integer index, so ``flatten`` gives them integer keys.
    Plain values (``int``, ``float``, ``bool``, ``str``, ``None``) are configuration by default
    and are included only with ``store_non_tensors=True``. (The seed README's example comment says
    an ``int`` step counter is "included"; that holds with ``store_non_tensors=True``, or when the
    counter is a tensor, which is what this library's optimizer does.)
    """

    def state_dict(
        self, keep_vars: bool = False, store_non_tensors: bool = False
    ) -> dict[str, StateValue]:
        """Returns the module's state as a nested dict.

        Args:
            keep_vars: Keep tensors as they are (attached to autograd) instead of ``detach()``-ed.
            store_non_tensors: Also include plain ``int``/``float``/``bool``/``str``/``None``.

        Returns:
            ``{attribute: value}``; tensors are the module's own storage (no copies).
        """
        state: dict[str, StateValue] = {}
        for name, value in vars(self).items():
            converted = _to_state(value, keep_vars, store_non_tensors)
            if converted is not _ABSENT:
                state[name] = converted
        return state

    def load_state_dict(
        self, state_dict: Mapping[str, StateValue], store_non_tensors: bool = False
    ) -> None:
        """Restores state produced by ``state_dict`` with the same ``store_non_tensors``.

        Tensors are copied into the existing tensors in place, so their identity (and any alias
        held elsewhere) is preserved; plain values replace the attribute.

        Raises:
            KeyError: If a key is missing from ``state_dict`` or unexpected in it; names its path.
            ValueError: If a tensor's shape differs or a tensor is expected and something else
                is given; names its path.
        """
        expected = self.state_dict(keep_vars=True, store_non_tensors=store_non_tensors)
        _check_same_keys(expected, state_dict, path=type(self).__name__)
        for name in expected:
            current = getattr(self, name)
            loaded = _load_into(
                current, state_dict[name], f"{type(self).__name__}.{name}", store_non_tensors
            )
            if loaded is not current:
                setattr(self, name, loaded)


class _Absent:
    """Marks an attribute that is not part of the state."""


_ABSENT = _Absent()


def _to_state(value: object, keep_vars: bool, store_non_tensors: bool) -> StateValue:
    if isinstance(value, torch.Tensor):
        return value if keep_vars else value.detach()
    if isinstance(value, OptimizerModule):
        return value.state_dict(keep_vars=keep_vars, store_non_tensors=store_non_tensors)
    if isinstance(value, (list, tuple, dict)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        converted = {
            key: item_state
            for key, item in items
            if (item_state := _to_state(item, keep_vars, store_non_tensors)) is not _ABSENT
        }
        return converted if converted or not value else _ABSENT
    if store_non_tensors and isinstance(value, _SCALAR_TYPES):
        return value
    return _ABSENT


def _check_same_keys(
    expected: Mapping[str, object] | Mapping[object, object],
    given: Mapping[str, object] | Mapping[object, object],
    path: str,
) -> None:
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    if missing or unexpected:
        raise KeyError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")


def _load_into(current: object, loaded: object, path: str, store_non_tensors: bool) -> object:
    """Loads ``loaded`` into ``current``; returns the value the attribute must hold afterwards."""
    if isinstance(current, torch.Tensor):
        if not isinstance(loaded, torch.Tensor):
            raise ValueError(f"{path}: expected a tensor, got {type(loaded).__name__}")
        if loaded.shape != current.shape:
            raise ValueError(
                f"{path}: shape {tuple(loaded.shape)} does not match {tuple(current.shape)}"
            )
        with torch.no_grad():
            current.copy_(loaded)
        return current
    if isinstance(current, OptimizerModule):
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{path}: expected a dict, got {type(loaded).__name__}")
        current.load_state_dict(loaded, store_non_tensors=store_non_tensors)
        return current
    if isinstance(current, (list, tuple, dict)):
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{path}: expected a dict, got {type(loaded).__name__}")
        expected = _to_state(current, True, store_non_tensors)
        assert isinstance(expected, dict)
        _check_same_keys(expected, loaded, path)
        items = list(current.items()) if isinstance(current, dict) else list(enumerate(current))
        new_items = {
            key: _load_into(item, loaded[key], f"{path}[{key!r}]", store_non_tensors)
            if key in loaded
            else item
            for key, item in items
        }
        if isinstance(current, tuple):
            return type(current)(new_items.values())
        for key, item in new_items.items():
            current[key] = item
        return current
    return loaded
