# pyre-strict
"""Configurations of the matrix functions behind the preconditioners (the reference's names and
defaults): how a factor's inverse root is computed and stabilised."""

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class RankDeficientStabilityConfig:
    """Base class: how a (nearly) singular factor is made invertible."""


@dataclass(frozen=True, kw_only=True)
class PerturbationConfig(RankDeficientStabilityConfig):
    """Adds the optimizer's ``epsilon`` to every eigenvalue (Tikhonov regularisation).

    Attributes:
        perturb_before_computation: Add ``epsilon * I`` to the factor before its
            eigendecomposition, and shift the eigenvalues by ``epsilon - min`` when the smallest
            is below ``epsilon``; otherwise decompose the factor itself, then shift by
            ``-min(min, 0)`` and add ``epsilon``. Equal in exact arithmetic, not in floating point.
    """

    perturb_before_computation: bool = True


DefaultPerturbationConfig = PerturbationConfig()


@dataclass(frozen=True, kw_only=True)
class PseudoInverseConfig(RankDeficientStabilityConfig):
    """The pseudo-inverse: eigenvalues at or below ``max(rank_atol, rank_rtol * max(lambda_max, 0))``
    (the numerical rank's cutoff of ``torch.linalg.matrix_rank``) count as zero, and so do their
    powers; the others are not perturbed. The optimizer's ``epsilon`` must be 0.

    Attributes:
        rank_atol: The absolute tolerance.
        rank_rtol: The relative tolerance; None: the number of eigenvalues times the dtype's
            machine epsilon.
    """

    rank_atol: float = 0.0
    rank_rtol: float | None = 0.0


@dataclass(frozen=True, kw_only=True)
class MatrixFunctionConfig:
    """Base class of the matrix function configurations."""


@dataclass(frozen=True, kw_only=True)
class EigendecompositionConfig(MatrixFunctionConfig):
    """An eigendecomposition of a symmetric factor.

    Attributes:
        rank_deficient_stability_config: How a singular factor is made invertible.
        tolerance: In [0, 1]; 0 decomposes every time (the only value the root computation takes).

    Raises:
        ValueError: ``tolerance`` is outside [0, 1].
    """

    rank_deficient_stability_config: RankDeficientStabilityConfig = DefaultPerturbationConfig
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.tolerance <= 1.0:
            raise ValueError(f"Invalid tolerance value: {self.tolerance}. Must be in the interval [0.0, 1.0].")


@dataclass(frozen=True, kw_only=True)
class EighEigendecompositionConfig(EigendecompositionConfig):
    """The eigendecomposition by ``torch.linalg.eigh``.

    Attributes:
        retry_double_precision: When ``eigh`` fails in the factor's precision, retry in float64
            (the result is rounded back).
        eigendecomposition_offload_device: Run ``eigh`` on this device ("": the factor's own).
    """

    retry_double_precision: bool = True
    eigendecomposition_offload_device: str = ""


DefaultEigendecompositionConfig = EighEigendecompositionConfig()


@dataclass(frozen=True, kw_only=True)
class QREigendecompositionConfig(EigendecompositionConfig):
    """The QR algorithm from the last eigenvectors ``Q``: QR steps on ``Q^T A Q`` until it is
    diagonal within ``tolerance`` (``|B - diag(B)|_F <= tolerance |B|_F``) or after
    ``max_iterations`` (SOAP's default: one step per computation).

    Attributes:
        max_iterations: The most QR steps per computation.
    """

    max_iterations: int = 1


@dataclass(frozen=True, kw_only=True)
class RootInvConfig(MatrixFunctionConfig):
    """Base class: how a matrix inverse root is computed."""


@dataclass(frozen=True, kw_only=True)
class EigenConfig(RootInvConfig, EighEigendecompositionConfig):
    """The inverse root from an ``eigh`` eigendecomposition: ``Q diag(l)^(-1/r) Q^T``.

    Raises:
        ValueError: ``tolerance`` is not 0.
    """

    def __post_init__(self) -> None:
        EighEigendecompositionConfig.__post_init__(self)
        if self.tolerance != 0.0:
            raise ValueError(f"Invalid tolerance value: {self.tolerance}. Must be 0.0 for {type(self).__name__}.")


DefaultEigenConfig = EigenConfig()


@dataclass(frozen=True, kw_only=True)
class CoupledNewtonConfig(RootInvConfig):
    """The inverse ``p``-th root by the coupled inverse Newton iteration (``p`` an integer), from
    ``X = z^(1/p) I`` and ``M = z (A + epsilon I)``, ``z = (p + 1) / (2 |A + epsilon I|_F)``:
    ``M' = (1 + 1/p) I - M / p``, ``X = X M'``, ``M = M'^p M``, until ``max |M - I| <= tolerance``.

    Attributes:
        max_iterations: The most iterations (a warning if they do not converge).
        tolerance: The largest entry of ``M - I`` at convergence.
    """

    max_iterations: int = 100
    tolerance: float = 1e-6


@dataclass(frozen=True, kw_only=True)
class CoupledHigherOrderConfig(RootInvConfig):
    """The inverse root ``A^(-q/p)`` (the root ``p/q`` as an exact fraction, small ``p`` and ``q``)
    by the coupled iteration of order ``order`` (2 is Newton's), as the reference computes it: the
    matrix is regularised by ``max(rel_epsilon * |A|_inf, abs_epsilon) * I`` (not by the
    optimizer's ``epsilon``), ``X = z^(1/p) I`` and ``M = z A`` with ``z = 1 / trace(A)``, one
    Newton step, then ``M' = sum_i b_i (I - M)^i`` (Lakic's coefficients), ``X = X M'``,
    ``M = M'^p M`` until ``max |M - I| <= tolerance``, stagnation or divergence; finally
    ``X^q``. A result off by more than 0.1 (``max |A X^p - I|``, also when that is NaN, which the
    reference lets pass) or not finite fails the computation (``ArithmeticError``): the block
    keeps its last good root.

    Attributes:
        rel_epsilon: The regulariser relative to ``|A|_inf``, an upper bound of the top eigenvalue.
        abs_epsilon: The absolute regulariser.
        max_iterations: The most iterations (a warning if they do not converge).
        tolerance: The largest entry of ``M - I`` at convergence.
        order: The order, >= 2.
        disable_tf32: Turn TF32 matmuls off during the computation (CUDA).

    Raises:
        ValueError: ``order`` < 2.
    """

    rel_epsilon: float
    abs_epsilon: float
    max_iterations: int = 100
    tolerance: float = 1e-8
    order: int = 3
    disable_tf32: bool = True

    def __post_init__(self) -> None:
        if self.order < 2:
            raise ValueError(f"Invalid order: {self.order}. Must be >= 2.")


def _unit_scale(d_in: int, d_out: int) -> float:
    return 1.0


@dataclass(frozen=True, kw_only=True)
class OrthogonalizationConfig(MatrixFunctionConfig):
    """Base class: how a matrix ``A = U S V^T`` is replaced by (an approximation of) ``U V^T``.

    Attributes:
        scale_by_dims_fn: The result is multiplied by ``scale_by_dims_fn(d_in, d_out)`` (the
            matrix's columns and rows).
    """

    scale_by_dims_fn: Callable[[int, int], float] = _unit_scale


@dataclass(frozen=True, kw_only=True)
class SVDOrthogonalizationConfig(OrthogonalizationConfig):
    """``U V^T`` from the reduced SVD.

    Attributes:
        scale_by_nuclear_norm: Multiply by the sum of the singular values.
    """

    scale_by_nuclear_norm: bool = False


@dataclass(frozen=True, kw_only=True)
class NewtonSchulzOrthogonalizationConfig(OrthogonalizationConfig):
    """The quintic Newton-Schulz iteration ``X <- a X + b X X^T X + c (X X^T)^2 X`` from
    ``A / max(|A|_F, 1e-8)`` (Muon's coefficients by default; they converge to [0.7, 1.3], not 1).

    Attributes:
        num_iterations: How many iterations.
        coefficients: ``(a, b, c)``.
    """

    num_iterations: int = 5
    coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


DefaultNewtonSchulzOrthogonalizationConfig = NewtonSchulzOrthogonalizationConfig()
