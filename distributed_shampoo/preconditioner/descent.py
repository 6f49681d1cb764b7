# pyre-strict
"""Sign descent and spectral descent: search directions computed from the filtered gradient
alone, with no preconditioner state (the reference's ``SignDescentPreconditionerConfig`` and
``SpectralDescentPreconditionerConfig``)."""

import torch

from distributed_shampoo.preconditioner.matrix_functions_types import (
    NewtonSchulzOrthogonalizationConfig,
    OrthogonalizationConfig,
    SVDOrthogonalizationConfig,
)
from distributed_shampoo.shampoo_types import (
    PreconditionerConfig,
    SignDescentPreconditionerConfig,
    SpectralDescentPreconditionerConfig,
)


def descent_direction(grad: torch.Tensor, config: PreconditionerConfig) -> torch.Tensor:
    """The direction of a block's filtered gradient ``grad``: ``sign(grad) * scale_fn(grad)`` for
    sign descent, ``grad`` orthogonalized (2-D) for spectral descent.

    Raises:
        ValueError: Another config (a Shampoo block preconditions with its own state instead).
    """
    if isinstance(config, SignDescentPreconditionerConfig):
        return torch.sign(grad).mul_(config.scale_fn(grad))
    if isinstance(config, SpectralDescentPreconditionerConfig):
        return matrix_orthogonalization(grad, config.orthogonalization_config)
    raise ValueError(f"{type(config).__name__} has no stateless descent direction")


def matrix_orthogonalization(matrix: torch.Tensor, config: OrthogonalizationConfig) -> torch.Tensor:
    """The closest (semi-)orthogonal matrix to ``matrix`` (``U V^T`` of its reduced SVD, or the
    Newton-Schulz approximation), times ``scale_by_dims_fn(columns, rows)``.

    Raises:
        ValueError: ``matrix`` is not 2-D, or the config is of another kind.
    """
    if matrix.dim() != 2:
        raise ValueError(f"orthogonalization needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    scaling = config.scale_by_dims_fn(matrix.shape[1], matrix.shape[0])
    if isinstance(config, SVDOrthogonalizationConfig):
        left, singular_values, right = torch.linalg.svd(matrix, full_matrices=False)
        orthogonal = left @ right
        if config.scale_by_nuclear_norm:
            orthogonal.mul_(singular_values.sum())
        return orthogonal.mul_(scaling)
    if isinstance(config, NewtonSchulzOrthogonalizationConfig):
        return _newton_schulz(matrix, config).mul_(scaling)
    raise ValueError(f"orthogonalization_config {type(config).__name__} is not implemented")


def _newton_schulz(matrix: torch.Tensor, config: NewtonSchulzOrthogonalizationConfig) -> torch.Tensor:
    """Iterates on the wide orientation's transpose (``X^T X`` is the smaller Gram matrix)."""
    x = matrix / max(float(torch.linalg.matrix_norm(matrix)), 1e-8)
    transposed = matrix.shape[0] < matrix.shape[1]
    if transposed:
        x = x.T
    a, b, c = config.coefficients
    for _ in range(config.num_iterations):
        gram = x.T @ x
        x = a * x + x @ (b * gram + c * gram @ gram)
    return x.T if transposed else x
