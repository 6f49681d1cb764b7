# pyre-strict
"""Grafting: the diagonal optimizer whose per-block step size Shampoo's direction borrows."""

import torch

from distributed_shampoo.shampoo_types import (
    AdaGradPreconditionerConfig,
    AdamPreconditionerConfig,
    GraftingConfig,
    RMSpropPreconditionerConfig,
    SGDPreconditionerConfig,
)


class Grafting:
    """A diagonal preconditioner built from a ``GraftingConfig``.

    SGD keeps no state. AdaGrad, RMSprop and Adam keep one accumulator ``v`` of squared gradients
    per block: ``v += g^2`` (AdaGrad, ``beta2 == 1``) or ``v = beta2 v + (1 - beta2) g^2``; their
    direction is ``x / (sqrt(v / c) + epsilon)`` with ``c = 1 - beta2^t`` for Adam and 1 otherwise.

    Raises:
        TypeError: For a config of another type.
    """

    def __init__(self, config: GraftingConfig) -> None:
        self.has_state: bool = not isinstance(config, SGDPreconditionerConfig)
        self._beta2: float = 1.0
        self._epsilon: float = 0.0
        self._bias_corrected: bool = False
        if isinstance(config, AdaGradPreconditionerConfig):
            self._epsilon = config.epsilon
        elif isinstance(config, (RMSpropPreconditionerConfig, AdamPreconditionerConfig)):
            self._beta2, self._epsilon = config.beta2, config.epsilon
            self._bias_corrected = isinstance(config, AdamPreconditionerConfig)
        elif not isinstance(config, SGDPreconditionerConfig):
            raise TypeError(f"grafting_config: unsupported {type(config).__name__}")

    def update(self, accumulator: torch.Tensor | None, grad: torch.Tensor) -> None:
        """Adds ``grad^2`` to ``accumulator`` (no-op for SGD, whose accumulator is None)."""
        if accumulator is None:
            return
        if self._beta2 == 1.0:
            accumulator.addcmul_(grad, grad)
        else:
            accumulator.mul_(self._beta2).addcmul_(grad, grad, value=1.0 - self._beta2)

    def direction(self, accumulator: torch.Tensor | None, grad: torch.Tensor, step: int) -> torch.Tensor:
        """Returns the grafting direction of ``grad`` at step ``step`` (counting from 1)."""
        if accumulator is None:
            return grad
        bias_correction = 1.0 - self._beta2**step if self._bias_corrected else 1.0
        denominator = accumulator.div(bias_correction).sqrt_().add_(self._epsilon)
        return grad / denominator
