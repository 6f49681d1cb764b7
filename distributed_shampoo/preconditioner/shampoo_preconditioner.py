# pyre-strict
"""The Kronecker-factored Shampoo preconditioner of one block."""

import torch

from distributed_shampoo.distributor.shampoo_block_info import BlockInfo
from distributed_shampoo.utils.optimizer_modules import OptimizerModule
from distributed_shampoo.utils.shampoo_quantization import (
    DequantizeQuantizedTensorListContext,
    QuantizedTensorList,
)

# Factors are accumulated in float32 (float64 when stored in float64) whatever their storage
# dtype, and their inverse roots are computed in float64: the eigenvalues of an accumulated factor
# span many orders of magnitude.
FACTOR_COMPUTATION_DTYPE: torch.dtype = torch.float32
ROOT_COMPUTATION_DTYPE: torch.dtype = torch.float64


def matrix_inverse_root(matrix: torch.Tensor, root: int, epsilon: float) -> torch.Tensor:
    """Returns ``(matrix + epsilon * I)^(-1/root)`` of a symmetric positive semi-definite matrix.

    Computed as the reference implementation does by default (its ``PerturbationConfig``): a
    symmetric eigendecomposition of ``matrix + epsilon * I`` in float64; if its smallest
    eigenvalue ``l`` is below ``epsilon`` (rounding, or a matrix that is not positive
    semi-definite), every eigenvalue is shifted by ``epsilon - l``, so the smallest is
    ``epsilon`` and the result is always finite.

    Args:
        matrix: A symmetric ``(n, n)`` matrix.
        root: The root, >= 1.
        epsilon: The regulariser added to every eigenvalue, > 0.

    Returns:
        A float64 ``(n, n)`` matrix.
    """
    matrix = matrix.to(ROOT_COMPUTATION_DTYPE)
    identity = torch.eye(matrix.shape[0], dtype=ROOT_COMPUTATION_DTYPE, device=matrix.device)
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix + epsilon * identity)
    smallest = float(eigenvalues.min())
    if smallest < epsilon:
        eigenvalues = eigenvalues.add(-smallest).add(epsilon)
    return (eigenvectors * eigenvalues.pow(-1.0 / root)) @ eigenvectors.T


class ShampooPreconditioner(OptimizerModule):
    """One factor matrix per dimension of a block, and the inverse root of each.

    Its state dict is ``{"factor_matrices": {0: L, 1: R, ...}, "inv_factor_matrices": {...}}``.

    Args:
        block_info: The block; its ``allocate_zeros_tensor`` allocates the matrices on its
            parameter's device.
        block_shape: The block's shape (at least one dimension).
        dtype: The storage dtype of the factors and roots (float64, float32, bfloat16 or float16).
    """

    def __init__(self, block_info: BlockInfo, block_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        def matrices() -> tuple[torch.Tensor, ...]:
            return tuple(
                block_info.allocate_zeros_tensor(size=(size, size), dtype=dtype, device=block_info.param.device)
                for size in block_shape
            )

        self.factor_matrices: tuple[torch.Tensor, ...] = matrices()
        self.inv_factor_matrices: tuple[torch.Tensor, ...] = matrices()

    def update_factors(self, grad: torch.Tensor, beta2: float) -> None:
        """``factor_i = beta2 * factor_i + (1 - beta2) * G_(i) G_(i)^T``, a plain sum if ``beta2 == 1``.

        ``G_(i)`` is the gradient block unfolded along dimension ``i``.
        """
        storage_dtype = self.factor_matrices[0].dtype
        computation_dtype = torch.promote_types(storage_dtype, FACTOR_COMPUTATION_DTYPE)
        grad = grad.to(computation_dtype)
        dims = range(grad.dim())
        storage = QuantizedTensorList([(factor, None, None) for factor in self.factor_matrices], storage_dtype, computation_dtype)
        with DequantizeQuantizedTensorListContext(storage) as factors:
            for dim, factor in enumerate(factors.dequantized_value):
                others = [other for other in dims if other != dim]
                outer_product = torch.tensordot(grad, grad, dims=(others, others))
                if beta2 == 1.0:
                    factor.add_(outer_product)
                else:
                    factor.mul_(beta2).add_(outer_product, alpha=1.0 - beta2)

    def compute_inverse_roots(self, epsilon: float, bias_correction2: float) -> None:
        """Sets ``inv_factor_i = (factor_i / bias_correction2 + epsilon * I)^(-1/(2k))``, k the order."""
        root = 2 * len(self.factor_matrices)
        for factor, inverse_root in zip(self.factor_matrices, self.inv_factor_matrices):
            inverse_root.copy_(matrix_inverse_root(factor.to(ROOT_COMPUTATION_DTYPE) / bias_correction2, root, epsilon))

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        """Multiplies ``grad`` by every inverse root along its dimension; returns a new tensor."""
        preconditioned = grad
        for inverse_root in self.inv_factor_matrices:
            # Contracting dimension 0 moves the new dimension last, so after k contractions the
            # dimensions are back in order (the roots are symmetric).
            preconditioned = torch.tensordot(preconditioned, inverse_root.to(grad.dtype), dims=([0], [0]))
        return preconditioned
