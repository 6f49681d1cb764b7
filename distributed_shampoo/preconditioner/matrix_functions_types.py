# pyre-strict
"""Configurations of the matrix functions behind the preconditioners (the reference's names and
defaults): how a factor's inverse root is computed and stabilised."""

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
