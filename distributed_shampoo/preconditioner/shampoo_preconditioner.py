# pyre-strict
"""The Kronecker-factored Shampoo preconditioner of one block."""

import torch

from distributed_shampoo.distributor.shampoo_block_info import BlockInfo
from distributed_shampoo.preconditioner.matrix_functions_types import (
    DefaultEigenConfig,
    EigenConfig,
    EighEigendecompositionConfig,
    PerturbationConfig,
)
from distributed_shampoo.shampoo_types import PreconditionerValueError, RootInvShampooPreconditionerConfig
from distributed_shampoo.utils.optimizer_modules import OptimizerModule
from distributed_shampoo.utils.shampoo_quantization import (
    DequantizeQuantizedTensorListContext,
    QuantizedTensorList,
)

# Factors are accumulated in float32 (float64 when stored in float64) whatever their storage
# dtype; their inverse roots are computed in that dtype too (as the reference computes them in the
# factor's dtype; it has no bfloat16/float16 eigh on CPU either).
FACTOR_COMPUTATION_DTYPE: torch.dtype = torch.float32


def matrix_inverse_root(
    matrix: torch.Tensor, exponent: float, epsilon: float, config: EigenConfig = DefaultEigenConfig
) -> torch.Tensor:
    """Returns ``(matrix + epsilon * I)^(-exponent)`` of a symmetric positive semi-definite matrix,
    in ``matrix``'s dtype, as the reference's ``EigenConfig`` computes it.

    With ``PerturbationConfig(perturb_before_computation=True)`` (the default): the
    eigendecomposition of ``matrix + epsilon * I``; if its smallest eigenvalue ``l`` is below
    ``epsilon`` (rounding, or a matrix that is not positive semi-definite), every eigenvalue is
    shifted by ``epsilon - l``. With ``False``: that of ``matrix``, every eigenvalue shifted by
    ``-min(l, 0)``, then ``epsilon`` added. So the result is always finite.

    Args:
        matrix: A symmetric ``(n, n)`` float32 or float64 matrix.
        exponent: The root's exponent, > 0 (``1 / (2 k)`` for a block of order ``k``).
        epsilon: The regulariser added to every eigenvalue, > 0.
        config: ``eigh``'s retry in float64 and offload device, and the perturbation.

    Raises:
        torch.linalg.LinAlgError, RuntimeError: The eigendecomposition failed (also in float64
            when ``retry_double_precision``).
    """
    perturbation = config.rank_deficient_stability_config
    before = not isinstance(perturbation, PerturbationConfig) or perturbation.perturb_before_computation
    dtype = matrix.dtype
    if before:
        matrix = matrix + epsilon * torch.eye(matrix.shape[0], dtype=dtype, device=matrix.device)
    eigenvalues, eigenvectors = _eigh(matrix, config)
    smallest = float(eigenvalues.min())
    if before and smallest < epsilon:
        eigenvalues = eigenvalues.add(-smallest).add(epsilon)
    elif not before:
        eigenvalues = eigenvalues.add(-min(smallest, 0.0)).add(epsilon)
    return (eigenvectors * eigenvalues.pow(-exponent)) @ eigenvectors.T


def _eigh(matrix: torch.Tensor, config: EighEigendecompositionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` on the configured device, retried in float64 if it fails and the
    config asks; the results in ``matrix``'s dtype and device."""
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


class ShampooPreconditioner(OptimizerModule):
    """One factor matrix per preconditioned dimension of a block, and the inverse root of each.

    Its state dict is ``{"factor_matrices": {0: L, 1: R, ...}, "inv_factor_matrices": {...}}``,
    numbered over the preconditioned dimensions (those whose exponent is not 0). The roots start
    as identities, as in the reference, so a block whose first root computation failed is not
    preconditioned.

    Args:
        block_info: The block; its ``allocate_zeros_tensor`` allocates the matrices on its
            parameter's device.
        block_shape: The block's shape (at least one dimension).
        config: The factors' and roots' dtypes, the exponents and the root computation.
    """

    def __init__(self, block_info: BlockInfo, block_shape: tuple[int, ...], config: RootInvShampooPreconditionerConfig) -> None:
        device = block_info.param.device
        inv_dtype = config.inv_factor_matrix_dtype or block_info.param.dtype
        # Not containers: the state dict holds only the matrices.
        self._config = config
        self._order: int = len(block_shape)
        self._failures: int = 0
        dims = [dim for dim, _ in self._preconditioned()]
        self.factor_matrices: tuple[torch.Tensor, ...] = tuple(
            block_info.allocate_zeros_tensor(size=(block_shape[dim], block_shape[dim]), dtype=config.factor_matrix_dtype, device=device)
            for dim in dims
        )
        self.inv_factor_matrices: tuple[torch.Tensor, ...] = tuple(
            block_info.allocate_eye_tensor(n=block_shape[dim], dtype=inv_dtype, device=device) for dim in dims
        )

    def _preconditioned(self) -> list[tuple[int, float]]:
        """``(dimension, exponent)`` of each preconditioned dimension, in order."""
        return [(dim, exponent) for dim, exponent in enumerate(self._config.inverse_exponents(self._order)) if exponent != 0.0]

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
                others = [other for other in dims if other != dim]
                outer_product = torch.tensordot(grad, grad, dims=(others, others))
                if beta2 == 1.0:
                    factor.add_(outer_product)
                else:
                    factor.mul_(beta2).add_(outer_product, alpha=1.0 - beta2)

    def compute_inverse_roots(self, epsilon: float, bias_correction2: float) -> None:
        """Sets ``inv_factor_i = (factor_i / bias_correction2 + epsilon * I)^(-exponent_i)``.

        A root whose eigendecomposition fails keeps its last value; the block tolerates
        ``num_tolerated_failed_amortized_computations`` such computations in a row.

        Raises:
            PreconditionerValueError: A factor or a computed root holds NaN or infinity.
            ValueError: One failure more than tolerated in a row (from the last failure).
        """
        failure: Exception | None = None
        computation_dtype = torch.promote_types(self._config.factor_matrix_dtype, FACTOR_COMPUTATION_DTYPE)
        exponents = [exponent for _, exponent in self._preconditioned()]
        for index, (factor, inverse_root, exponent) in enumerate(zip(self.factor_matrices, self.inv_factor_matrices, exponents)):
            matrix = factor.to(computation_dtype) / bias_correction2
            if not torch.isfinite(matrix).all():
                raise PreconditionerValueError(f"Encountered nan/inf values in factor matrix {index}")
            try:
                root = matrix_inverse_root(matrix, exponent, epsilon, self._config.amortized_computation_config)  # pyre-ignore[6]: an EigenConfig (checked by the config)
            except RuntimeError as error:
                failure = error
                continue
            if not torch.isfinite(root).all():
                raise PreconditionerValueError(f"Encountered nan or inf values in the inverse root of factor matrix {index}")
            inverse_root.copy_(root)
        self._failures = self._failures + 1 if failure is not None else 0
        if self._failures > self._config.num_tolerated_failed_amortized_computations:
            raise ValueError(
                f"The number of failed amortized computations of a block exceeded the allowed tolerance "
                f"({self._config.num_tolerated_failed_amortized_computations}). The last seen exception was {failure}."
            ) from failure

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        """Multiplies ``grad`` by every inverse root along its dimension; returns a new tensor."""
        preconditioned = grad
        roots = {dim: root for (dim, _), root in zip(self._preconditioned(), self.inv_factor_matrices)}
        for dim in range(grad.dim()):
            # Contracting dimension 0 moves the new dimension last, so after k contractions the
            # dimensions are back in order (the roots are symmetric); an unpreconditioned
            # dimension just moves last.
            root = roots.get(dim)
            if root is None:
                preconditioned = preconditioned.movedim(0, -1)
            else:
                preconditioned = torch.tensordot(preconditioned, root.to(grad.dtype), dims=([0], [0]))
        return preconditioned
