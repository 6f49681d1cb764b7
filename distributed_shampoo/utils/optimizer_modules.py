# pyre-strict
"""``OptimizerModule``: an ``nn.Module``-like base whose state is a recursive state dict.

The contract is the reference's (facebookresearch/optimizers at ``18178f4``).
"""

import logging
from collections.abc import Iterable, Mapping
from copy import deepcopy

import torch

logger: logging.Logger = logging.getLogger(__name__)

# A state dict: attribute (or index) -> tensor, plain value, or nested state dict.
StateDict = dict[object, object]

_CONTAINERS: tuple[type[object], ...] = (list, tuple, set)


class OptimizerModule:
    """Base class of stateful optimizer components.

    ``state_dict`` walks the instance's attributes: tensors are stored (detached unless
    ``keep_vars``), nested ``OptimizerModule``s and dicts become nested dicts, lists, tuples and
    sets become dicts keyed by position, and every other value (int, float, str, None, ...) is
    stored only with ``store_non_tensors=True``. A container keeps its (possibly empty) dict even
    when it holds only such values.

    ``load_state_dict`` is the inverse and is lenient, as in the reference: tensors are copied in
    place (identity kept), keys absent from the state to load keep their values, and a value of
    another kind than the current one is skipped with a warning.
    """

    def state_dict(
        self, destination: StateDict | None = None, keep_vars: bool = False, store_non_tensors: bool = False
    ) -> StateDict:
        """Returns the module's state (into ``destination`` if given).

        Args:
            destination: A dict to fill and return instead of a new one.
            keep_vars: Keep tensors attached to autograd instead of ``detach()``-ing them.
            store_non_tensors: Also store values that are not tensors (nor containers of them).

        Returns:
            ``{attribute: value}``; tensors are the module's own storage (no copies).
        """
        target: StateDict = {} if destination is None else destination
        _store(vars(self).items(), target, keep_vars, store_non_tensors)
        return target

    def load_state_dict(self, state_dict: Mapping[object, object], store_non_tensors: bool = False) -> None:
        """Loads what ``state_dict`` produced, in place (see the class docstring).

        Args:
            state_dict: The state to load.
            store_non_tensors: Also replace values that are not tensors (with deep copies).
        """
        _load(vars(self), state_dict, store_non_tensors)


def _store(items: Iterable[tuple[object, object]], destination: StateDict, keep_vars: bool, store_non_tensors: bool) -> None:
    for key, value in items:
        if isinstance(value, torch.Tensor):
            destination[key] = value if keep_vars else value.detach()
        elif isinstance(value, OptimizerModule):
            destination[key] = value.state_dict(keep_vars=keep_vars, store_non_tensors=store_non_tensors)
        elif isinstance(value, dict):
            destination[key] = nested = {}
            _store(value.items(), nested, keep_vars, store_non_tensors)
        elif isinstance(value, _CONTAINERS):
            destination[key] = nested = {}
            _store(enumerate(value), nested, keep_vars, store_non_tensors)  # pyre-ignore[6]: list, tuple or set
        elif store_non_tensors:
            destination[key] = value


def _load(current: object, loaded: object, store_non_tensors: bool) -> object:
    """Loads ``loaded`` into ``current``; returns the value that holds the result."""
    if isinstance(current, torch.Tensor):
        if not isinstance(loaded, torch.Tensor):
            logger.warning(f"Both old state {current} and new state {loaded} must be tensors! Continuing...")
            return current
        current.detach().copy_(loaded)
        return current
    if isinstance(current, OptimizerModule):
        if isinstance(loaded, Mapping):
            current.load_state_dict(loaded, store_non_tensors)
        else:
            logger.warning(f"The state of {type(current).__name__} must be a dict, got {type(loaded).__name__}! Continuing...")
        return current
    if isinstance(current, dict):
        if not isinstance(loaded, Mapping):
            logger.warning(f"Both old state {current} and new_state {loaded} must be dicts! Continuing...")
            return current
        current.update({key: _load(value, loaded[key], store_non_tensors) for key, value in current.items() if key in loaded})
        return current
    if isinstance(current, _CONTAINERS):
        if not isinstance(loaded, Mapping):
            logger.warning(f"The state of a {type(current).__name__} must be a dict, got {type(loaded).__name__}! Continuing...")
            return current
        items = [
            _load(item, loaded[position], store_non_tensors)
            if position in loaded and (store_non_tensors or isinstance(item, (torch.Tensor, dict, OptimizerModule, *_CONTAINERS)))
            else item
            for position, item in enumerate(current)  # pyre-ignore[6]: list, tuple or set
        ]
        return type(current)(items)  # pyre-ignore[19]: a list, tuple or set of the items
    if not store_non_tensors:
        return current
    if type(current) is not type(loaded):
        logger.warning(f"Types of old value {type(current)} and new value {type(loaded)} do not match! Continuing...")
        return current
    return deepcopy(loaded)
