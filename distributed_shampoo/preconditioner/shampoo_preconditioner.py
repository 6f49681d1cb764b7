# pyre-strict
"""The Kronecker-factored Shampoo preconditioners of one block: with inverse roots (the default)
or with eigendecompositions of the factors."""

import torch

from distributed_shampoo.distributor.shampoo_block_info import BlockInfo
from distributed_shampoo.preconditioner.matrix_functions_types import (
    DefaultEigenConfig,
    EighEigendecompositionConfig,
    PerturbationConfig,
)
from distributed_shampoo.shampoo_types import (
    EigendecomposedShampooPreconditionerConfig,
    PreconditionerValueError,
    RootInvShampooPreconditionerConfig,
    ShampooPreconditionerConfig,
)
from distributed_shampoo.utils.optimizer_modules import OptimizerModule
from distributed_shampoo.utils.shampoo_quantization import (
    DequantizeQuantizedTensorListContext,
    QuantizedTensorList,
)

# Factors are accumulated in float32 (float64 when stored in float64) whatever their storage
# dtype; their roots and eigendecompositions are computed in that dtype too (as the reference
# computes them in the factor's dtype; it has no bfloat16/float16 eigh on CPU either).
FACTOR_COMPUTATION_DTYPE: torch.dtype = torch.float32


def _perturbs_before(config: EighEigendecompositionConfig) -> bool:
    stability = config.rank_deficient_stability_config
    return not isinstance(stability, PerturbationConfig) or stability.perturb_before_computation


def eigendecomposition(
    matrix: torch.Tensor, epsilon: float, config: EighEigendecompositionConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigenvalues and eigenvectors of ``matrix + epsilon * I`` (of ``matrix`` when the config
    perturbs after the computation), in ``matrix``'s dtype and device.

    Raises:
        torch.linalg.LinAlgError, RuntimeError: ``eigh`` failed (also in float64 when
            ``retry_double_precision``).
    """
    if _perturbs_before(config):
        matrix = matrix + epsilon * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    device, dtype = matrix.device, matrix.dtype
    if config.eigendecomposition_offload_device:
        matrix = matrix.to(device=config.eigendecomposition_offload_device)
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    except RuntimeError:  # torch.linalg.LinAlgError is one
        if not config.retry_double_precision or matrix.dtype == torch.float64:
            raise
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix.double())
    return eigenvalues.to(device=device, dtype=dtype), eigenvectors.to(device=device, dtype=dtype)


def stabilized_power(eigenvalues: torch.Tensor, exponent: float, epsilon: float, config: EighEigendecompositionConfig) -> torch.Tensor:
    """``eigenvalues^(-exponent)`` once made positive, as the reference's ``PerturbationConfig``:
    perturbed before the computation, all are shifted by ``epsilon - l`` if the smallest ``l`` is
    below ``epsilon``; perturbed after, shifted by ``-min(l, 0)`` and then ``epsilon`` added."""
    smallest = float(eigenvalues.min())
    if not _perturbs_before(config):
        eigenvalues = eigenvalues.add(-min(smallest, 0.0)).add(epsilon)
    elif smallest < epsilon:
        eigenvalues = eigenvalues.add(-smallest).add(epsilon)
    return eigenvalues.pow(-exponent)


def matrix_inverse_root(
    matrix: torch.Tensor, exponent: float, epsilon: float, config: EighEigendecompositionConfig = DefaultEigenConfig
) -> torch.Tensor:
    """Returns ``(matrix + epsilon * I)^(-exponent)`` of a symmetric positive semi-definite matrix,
    in ``matrix``'s dtype, as the reference's ``EigenConfig`` computes it: ``Q diag(p) Q^T`` with
    ``eigendecomposition`` and ``stabilized_power``, so the result is always finite.

    Args:
        matrix: A symmetric ``(n, n)`` float32 or float64 matrix.
        exponent: The root's exponent, > 0 (``1 / (2 k)`` for a block of order ``k``).
        epsilon: The regulariser added to every eigenvalue, > 0.
        config: ``eigh``'s retry in float64 and offload device, and the perturbation.

    Raises:
        torch.linalg.LinAlgError, RuntimeError: As ``eigendecomposition``.
    """
    eigenvalues, eigenvectors = eigendecomposition(matrix, epsilon, config)
    return (eigenvectors * stabilized_power(eigenvalues, exponent, epsilon, config)) @ eigenvectors.T


class ShampooPreconditioner(OptimizerModule):
    """One factor matrix per preconditioned dimension of a block (``factor_matrices``, numbered
    over the dimensions whose exponent is not 0) and what each preconditions with, which the
    subclass keeps and recomputes every ``precondition_frequency`` steps.

    Args:
        block_info: The block; allocates the matrices on its parameter's device.
        block_shape: The block's shape (at least one dimension).
        config: The factors' dtype, the exponents, the matrix function and its failure tolerance.
    """

    def __init__(self, block_info: BlockInfo, block_shape: tuple[int, ...], config: ShampooPreconditionerConfig) -> None:
        # Not containers: the state dict holds only the matrices.
        self._config = config
        self._order: int = len(block_shape)
        self._failures: int = 0
        self.factor_matrices: tuple[torch.Tensor, ...] = tuple(
            block_info.allocate_zeros_tensor(size=(size, size), dtype=config.factor_matrix_dtype, device=block_info.param.device)
            for size in self._sizes(block_shape)
        )

    def _preconditioned(self) -> list[tuple[int, float]]:
        """``(dimension, exponent)`` of each preconditioned dimension, in order."""
        return [(dim, exponent) for dim, exponent in enumerate(self._config.inverse_exponents(self._order)) if exponent != 0.0]

    def _sizes(self, block_shape: tuple[int, ...]) -> list[int]:
        """The size of each preconditioned dimension."""
        return [block_shape[dim] for dim, _ in self._preconditioned()]

    def update_factors(self, grad: torch.Tensor, beta2: float) -> None:
        """``factor_i = beta2 * factor_i + (1 - beta2) * G_(i) G_(i)^T``, a plain sum if ``beta2 == 1``.

        ``G_(i)`` is the gradient block unfolded along preconditioned dimension ``i``.
        """
        if not self.factor_matrices:
            return
        storage_dtype = self.factor_matrices[0].dtype
        computation_dtype = torch.promote_types(storage_dtype, FACTOR_COMPUTATION_DTYPE)
        grad = grad.to(computation_dtype)
        dims = range(grad.dim())
        storage = QuantizedTensorList([(factor, None, None) for factor in self.factor_matrices], storage_dtype, computation_dtype)
        with DequantizeQuantizedTensorListContext(storage) as factors:
            for (dim, _), factor in zip(self._preconditioned(), factors.dequantized_value):
                if beta2 != 1.0:
                    factor.mul_(beta2)
                if grad.dim() == 2:  # a matrix product without tensordot's transposed copy
                    unfolded = grad if dim == 0 else grad.T
                    factor.addmm_(unfolded, unfolded.T, alpha=1.0 - beta2 if beta2 != 1.0 else 1.0)
                    continue
                others = [other for other in dims if other != dim]
                factor.add_(torch.tensordot(grad, grad, dims=(others, others)), alpha=1.0 - beta2 if beta2 != 1.0 else 1.0)

    def amortized_computation(self, epsilon: float, bias_correction2: float) -> None:
        """Recomputes what each factor preconditions with, from ``factor_i / bias_correction2``.

        A computation that fails keeps the factor's last result; the block tolerates
        ``num_tolerated_failed_amortized_computations`` such steps in a row.

        Raises:
            PreconditionerValueError: A factor or a computed result holds NaN or infinity.
            ValueError: One failure more than tolerated in a row (from the last failure).
        """
        failure: Exception | None = None
        computation_dtype = torch.promote_types(self._config.factor_matrix_dtype, FACTOR_COMPUTATION_DTYPE)
        for index, (factor, (_, exponent)) in enumerate(zip(self.factor_matrices, self._preconditioned())):
            matrix = factor.to(computation_dtype) / bias_correction2
            if not torch.isfinite(matrix).all():
                raise PreconditionerValueError(f"Encountered nan/inf values in factor matrix {index}")
            try:
                results = self._compute(matrix, exponent, epsilon)
            except RuntimeError as error:
                failure = error
                continue
            if not all(torch.isfinite(result).all() for result in results):
                raise PreconditionerValueError(f"Encountered nan or inf values in the results of factor matrix {index}")
            self._store(index, results)
        self._failures = self._failures + 1 if failure is not None else 0
        if self._failures > self._config.num_tolerated_failed_amortized_computations:
            raise ValueError(
                f"The number of failed amortized computations of a block exceeded the allowed tolerance "
                f"({self._config.num_tolerated_failed_amortized_computations}). The last seen exception was {failure}."
            ) from failure

    def _compute(self, matrix: torch.Tensor, exponent: float, epsilon: float) -> tuple[torch.Tensor, ...]:
        """The amortized results of one bias-corrected factor (``_store`` keeps them)."""
        raise NotImplementedError

    def _store(self, index: int, results: tuple[torch.Tensor, ...]) -> None:
        raise NotImplementedError

    def _matrices(self, epsilon: float) -> list[torch.Tensor]:
        """The matrix each preconditioned dimension is multiplied by."""
        raise NotImplementedError

    def precondition(self, grad: torch.Tensor, epsilon: float) -> torch.Tensor:
        """Multiplies ``grad`` by each preconditioned dimension's matrix along it; returns a new tensor."""
        matrices = {dim: matrix.to(grad.dtype) for (dim, _), matrix in zip(self._preconditioned(), self._matrices(epsilon))}
        if grad.dim() == 2 and len(matrices) == 2:  # L G R, without tensordot's transposed copies
            return matrices[0] @ grad @ matrices[1]
        preconditioned = grad
        for dim in range(grad.dim()):
            # Contracting dimension 0 moves the new dimension last, so after k contractions the
            # dimensions are back in order (the matrices are symmetric); an unpreconditioned
            # dimension just moves last.
            matrix = matrices.get(dim)
            if matrix is None:
                preconditioned = preconditioned.movedim(0, -1)
            else:
                preconditioned = torch.tensordot(preconditioned, matrix, dims=([0], [0]))
        return preconditioned


class RootInvShampooPreconditioner(ShampooPreconditioner):
    """Keeps each factor's inverse root: ``{"factor_matrices": {0: L, ...}, "inv_factor_matrices":
    {0: L^(-e), ...}}``. The roots start as identities, as in the reference, so a block whose first
    computation failed is not preconditioned."""

    def __init__(self, block_info: BlockInfo, block_shape: tuple[int, ...], config: RootInvShampooPreconditionerConfig) -> None:
        super().__init__(block_info, block_shape, config)
        dtype = config.inv_factor_matrix_dtype or block_info.param.dtype
        self._eigen: EighEigendecompositionConfig = config.amortized_computation_config  # pyre-ignore[8]: an EigenConfig (the config checks)
        self.inv_factor_matrices: tuple[torch.Tensor, ...] = tuple(
            block_info.allocate_eye_tensor(n=size, dtype=dtype, device=block_info.param.device) for size in self._sizes(block_shape)
        )

    def _compute(self, matrix: torch.Tensor, exponent: float, epsilon: float) -> tuple[torch.Tensor, ...]:
        return (matrix_inverse_root(matrix, exponent, epsilon, self._eigen),)

    def _store(self, index: int, results: tuple[torch.Tensor, ...]) -> None:
        self.inv_factor_matrices[index].copy_(results[0])

    def _matrices(self, epsilon: float) -> list[torch.Tensor]:
        return list(self.inv_factor_matrices)


class EigendecomposedShampooPreconditioner(ShampooPreconditioner):
    """Keeps each factor's eigendecomposition: ``{"factor_matrices": ..., "factor_matrices_eigenvectors":
    {0: Q, ...}, "factor_matrices_eigenvalues": {0: l, ...}}`` (of ``L + epsilon I`` by default,
    in the parameter's dtype; identities and ones at first, as in the reference), and forms
    ``Q diag(stabilized l^(-e)) Q^T`` at every step."""

    def __init__(self, block_info: BlockInfo, block_shape: tuple[int, ...], config: EigendecomposedShampooPreconditionerConfig) -> None:
        super().__init__(block_info, block_shape, config)
        dtype, device = block_info.param.dtype, block_info.param.device
        self._eigen: EighEigendecompositionConfig = config.amortized_computation_config  # pyre-ignore[8]: checked by the config
        sizes = self._sizes(block_shape)
        self.factor_matrices_eigenvectors: tuple[torch.Tensor, ...] = tuple(
            block_info.allocate_eye_tensor(n=size, dtype=dtype, device=device) for size in sizes
        )
        self.factor_matrices_eigenvalues: tuple[torch.Tensor, ...] = tuple(
            block_info.allocate_ones_tensor(size=(size,), dtype=dtype, device=device) for size in sizes
        )

    def _compute(self, matrix: torch.Tensor, exponent: float, epsilon: float) -> tuple[torch.Tensor, ...]:
        return eigendecomposition(matrix, epsilon, self._eigen)

    def _store(self, index: int, results: tuple[torch.Tensor, ...]) -> None:
        self.factor_matrices_eigenvalues[index].copy_(results[0])
        self.factor_matrices_eigenvectors[index].copy_(results[1])

    def _matrices(self, epsilon: float) -> list[torch.Tensor]:
        return [
            (eigenvectors * stabilized_power(eigenvalues, exponent, epsilon, self._eigen)) @ eigenvectors.T
            for eigenvectors, eigenvalues, (_, exponent) in zip(
                self.factor_matrices_eigenvectors, self.factor_matrices_eigenvalues, self._preconditioned()
            )
        ]


def shampoo_preconditioner(block_info: BlockInfo, block_shape: tuple[int, ...], config: ShampooPreconditionerConfig) -> ShampooPreconditioner:
    """The preconditioner ``config`` asks for (root-inverse or eigendecomposed Shampoo).

    Raises:
        ValueError: Another preconditioner config (not implemented).
    """
    if isinstance(config, RootInvShampooPreconditionerConfig):
        return RootInvShampooPreconditioner(block_info, block_shape, config)
    if isinstance(config, EigendecomposedShampooPreconditionerConfig):
        return EigendecomposedShampooPreconditioner(block_info, block_shape, config)
    raise ValueError(f"preconditioner_config {type(config).__name__} is not implemented")
