# pyre-strict
"""The Kronecker-factored preconditioners of one block: Shampoo with inverse roots (the default),
Shampoo with eigendecompositions of the factors, and eigenvalue-corrected Shampoo (SOAP)."""

import warnings
from fractions import Fraction

import torch

from distributed_shampoo.distributor.shampoo_block_info import BlockInfo
from distributed_shampoo.preconditioner.matrix_functions_types import (
    CoupledHigherOrderConfig,
    CoupledNewtonConfig,
    DefaultEigenConfig,
    EigendecompositionConfig,
    EighEigendecompositionConfig,
    PerturbationConfig,
    PseudoInverseConfig,
    QREigendecompositionConfig,
    RootInvConfig,
)
from distributed_shampoo.shampoo_types import (
    AmortizedPreconditionerConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
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


def _perturbs_before(config: EigendecompositionConfig) -> bool:
    stability = config.rank_deficient_stability_config
    return not isinstance(stability, PerturbationConfig) or stability.perturb_before_computation


def eigendecomposition(
    matrix: torch.Tensor, epsilon: float, config: EigendecompositionConfig, estimate: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigenvalues and eigenvectors of ``matrix + epsilon * I`` (of ``matrix`` when the config
    perturbs after the computation), in ``matrix``'s dtype and device.

    ``eigh`` (``EighEigendecompositionConfig``; with a ``tolerance``, skipped when ``estimate``, the
    last eigenvectors, still diagonalises the matrix that well) or the QR algorithm from
    ``estimate`` (``QREigendecompositionConfig``), as the reference computes them.

    Raises:
        torch.linalg.LinAlgError, RuntimeError: ``eigh`` failed (also in float64 when
            ``retry_double_precision``).
        ValueError: A tolerance or the QR algorithm without an ``estimate``.
    """
    if _perturbs_before(config):
        matrix = matrix + epsilon * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    if config.tolerance != 0.0 or isinstance(config, QREigendecompositionConfig):
        if estimate is None:
            raise ValueError(f"{type(config).__name__} with its tolerance needs the last eigenvectors")
        estimate = estimate.to(matrix.dtype)
        if isinstance(config, QREigendecompositionConfig):
            return _qr_algorithm(matrix, estimate, config)
        eigenvalues_estimate = estimate.T @ matrix @ estimate
        if _diagonal_enough(eigenvalues_estimate, config.tolerance):
            return eigenvalues_estimate.diagonal().clone(), estimate
    if not isinstance(config, EighEigendecompositionConfig):
        raise ValueError(f"amortized_computation_config {type(config).__name__} is not implemented")
    return _eigh(matrix, config)


def _diagonal_enough(eigenvalues_estimate: torch.Tensor, tolerance: float) -> bool:
    """``|B - diag(B)|_F <= tolerance |B|_F`` (the reference's criterion)."""
    norm = torch.linalg.norm(eigenvalues_estimate)
    off_diagonal = torch.sqrt(norm**2 - torch.linalg.norm(eigenvalues_estimate.diagonal()) ** 2)
    return bool(off_diagonal <= tolerance * norm)


def _qr_algorithm(matrix: torch.Tensor, estimate: torch.Tensor, config: QREigendecompositionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``max_iterations`` QR steps on ``Q^T A Q`` from the estimate ``Q``, until diagonal
    within the tolerance; eigenvalues sorted ascending, eigenvectors with them."""
    eigenvalues_estimate = estimate.T @ matrix @ estimate
    for _ in range(config.max_iterations):
        if _diagonal_enough(eigenvalues_estimate, config.tolerance):
            break
        q, r = torch.linalg.qr(eigenvalues_estimate)
        eigenvalues_estimate = r @ q
        estimate = estimate @ q
    eigenvalues, order = eigenvalues_estimate.diagonal().sort(stable=True)
    return eigenvalues, estimate[:, order]


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


def stabilized_power(eigenvalues: torch.Tensor, exponent: float, epsilon: float, config: EigendecompositionConfig) -> torch.Tensor:
    """``eigenvalues^(-exponent)`` once made positive, as the reference's ``PerturbationConfig``:
    perturbed before the computation, all are shifted by ``epsilon - l`` if the smallest ``l`` is
    below ``epsilon``; perturbed after, shifted by ``-min(l, 0)`` and then ``epsilon`` added. With
    ``PseudoInverseConfig``, the powers of the eigenvalues at or below its cutoff are 0.

    Raises:
        ValueError: ``epsilon`` is not 0 with ``PseudoInverseConfig``.
    """
    stability = config.rank_deficient_stability_config
    if isinstance(stability, PseudoInverseConfig):
        if epsilon != 0.0:
            raise ValueError(f"epsilon={epsilon} should be 0.0 when using pseudo-inverse!")
        rtol = eigenvalues.numel() * torch.finfo(eigenvalues.dtype).eps if stability.rank_rtol is None else stability.rank_rtol
        cutoff = max(stability.rank_atol, rtol * float(eigenvalues.max().relu()))
        return torch.where(eigenvalues <= cutoff, torch.zeros_like(eigenvalues), eigenvalues.pow(-exponent))
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


def coupled_newton_inverse_root(matrix: torch.Tensor, root: int, epsilon: float, config: CoupledNewtonConfig) -> torch.Tensor:
    """``(matrix + epsilon * I)^(-1/root)`` by the coupled inverse Newton iteration, as the
    reference's ``CoupledNewtonConfig`` computes it (see there); warns if it does not converge."""
    identity = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    perturbed = matrix + epsilon * identity if epsilon != 0.0 else matrix
    alpha = -1.0 / root
    z = (root + 1) / (2 * torch.linalg.norm(perturbed))
    x = z ** (-alpha) * identity
    coupled = z * perturbed
    error = torch.dist(coupled, identity, p=torch.inf)
    iterations = 0
    while error > config.tolerance and iterations < config.max_iterations:
        iterations += 1
        step = coupled.mul(alpha).add_(identity, alpha=1.0 - alpha)
        x = x @ step
        coupled = torch.linalg.matrix_power(step, root) @ coupled
        error = torch.dist(coupled, identity, p=torch.inf)
    if error > config.tolerance:
        warnings.warn(f"coupled Newton did not converge in {config.max_iterations} iterations (error {float(error):.2e})", stacklevel=2)
    return x


def coupled_higher_order_inverse_root(matrix: torch.Tensor, root: Fraction, config: CoupledHigherOrderConfig) -> torch.Tensor:
    """``(matrix + r I)^(-1/root)`` by the coupled higher-order iteration, as the reference's
    ``CoupledHigherOrderConfig`` computes it (see there; ``r`` is the config's regulariser);
    warns if it does not converge.

    Raises:
        ArithmeticError: ``matrix`` is not finite, or the result is off or not finite.
    """
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    if config.disable_tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        p, q = root.numerator, root.denominator
        # Lakic's coefficients, rounded to the matrix's dtype as the reference keeps them.
        numerator = denominator = 1.0
        coefficients = [1.0]
        for i in range(1, config.order):
            numerator *= 1 + (i - 1) * p
            denominator *= i * p
            coefficients.append(torch.tensor(numerator / denominator, dtype=matrix.dtype).item())
        upper_bound = torch.linalg.matrix_norm(matrix, torch.inf)
        if not torch.isfinite(upper_bound):
            raise ArithmeticError("Input matrix has entries close to inf, exiting root inverse")
        regulariser = max(config.rel_epsilon * float(upper_bound), config.abs_epsilon)
        identity = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        ridge = matrix.add(identity, alpha=regulariser) if regulariser != 0.0 else matrix
        exponent = -1.0 / p
        z = 1.0 / torch.trace(ridge).item()
        x = (z ** (-exponent)) * identity
        coupled = z * ridge
        # One Newton step first: it puts the higher-order iteration where it converges.
        step = coupled.mul(exponent).add_(identity, alpha=1.0 - exponent)
        x = x @ step
        coupled = torch.linalg.matrix_power(step, p) @ coupled
        error = torch.linalg.vector_norm(coupled - identity, torch.inf)
        iterations = 1
        while error > config.tolerance and iterations < config.max_iterations:
            iterations += 1
            base = identity - coupled
            step = base.mul(coefficients[-1]).add_(identity, alpha=coefficients[-2])
            for coefficient in reversed(coefficients[: config.order - 2]):  # Horner's rule
                step = torch.addmm(identity, step, base, beta=coefficient)
            x = x @ step
            coupled = torch.linalg.matrix_power(step, p) @ coupled
            new_error = torch.linalg.vector_norm(coupled - identity, torch.inf)
            if new_error > error * 1.2 or (new_error == error and error < 1e-3):
                break  # diverging or stagnating: the reference stops early too
            error = new_error
        else:
            if error > config.tolerance:
                warnings.warn(
                    f"coupled higher-order iteration did not converge in {config.max_iterations} iterations (error {float(error):.2e})",
                    stacklevel=2,
                )
        off = torch.linalg.vector_norm(ridge @ torch.linalg.matrix_power(x, p) - identity, torch.inf)
        if not off <= 1e-1:  # a NaN error (X^p overflowed) fails too, where the reference lets it pass
            raise ArithmeticError(f"Error in matrix inverse root (before powering for fractions) {float(off)} exceeds threshold 1e-1")
        if q > 1:
            x = torch.linalg.matrix_power(x, q)
        if not torch.isfinite(x).all():
            raise ArithmeticError("NaN/Inf in matrix inverse root (after powering for fractions)")
        return x
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def along_dims(tensor: torch.Tensor, matrices: dict[int, torch.Tensor]) -> torch.Tensor:
    """``tensor`` with each dimension ``d`` in ``matrices`` multiplied by ``matrices[d]^T``
    (contracting ``d`` with the matrix's rows): ``M_0^T X M_1`` for a matrix ``X``."""
    if tensor.dim() == 2 and len(matrices) == 2:  # without tensordot's transposed copies
        return matrices[0].T @ tensor @ matrices[1]
    result = tensor
    for dim in range(tensor.dim()):
        # Contracting dimension 0 moves the new dimension last, so after k contractions the
        # dimensions are back in order; a dimension without a matrix just moves last.
        matrix = matrices.get(dim)
        result = result.movedim(0, -1) if matrix is None else torch.tensordot(result, matrix, dims=([0], [0]))
    return result


# The largest numerator or denominator of a root ``CoupledHigherOrderConfig`` takes.
_MAX_ROOT_TERM = 100


class ShampooPreconditioner(OptimizerModule):
    """One factor matrix per preconditioned dimension of a block (``factor_matrices``, numbered
    over those dimensions) and what each preconditions with, which the subclass keeps and
    recomputes every ``precondition_frequency`` steps (the amortized computation).

    Args:
        block_info: The block; allocates the matrices on its parameter's device.
        block_shape: The block's shape (at least one dimension).
        config: The factors' dtype, the preconditioned dimensions, the matrix function and its
            failure tolerance.
    """

    def __init__(self, block_info: BlockInfo, block_shape: tuple[int, ...], config: AmortizedPreconditionerConfig) -> None:
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
        config = self._config
        if not isinstance(config, ShampooPreconditionerConfig):
            raise NotImplementedError
        return [(dim, exponent) for dim, exponent in enumerate(config.inverse_exponents(self._order)) if exponent != 0.0]

    def _sizes(self, block_shape: tuple[int, ...]) -> list[int]:
        """The size of each preconditioned dimension."""
        return [block_shape[dim] for dim, _ in self._preconditioned()]

    def update(self, grad: torch.Tensor, beta2: float, epsilon: float, bias_correction2: float, amortize: bool) -> None:
        """One step's update from the block's gradient: the factors, then (when ``amortize``) the
        amortized computation from ``factor_i / bias_correction2``.

        Raises:
            PreconditionerValueError, ValueError: As ``amortized_computation``.
        """
        self.update_factors(grad, beta2)
        if amortize:
            self.amortized_computation(epsilon, bias_correction2)

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
        weight = 1.0 - beta2 if beta2 != 1.0 else 1.0
        storage = QuantizedTensorList([(factor, None, None) for factor in self.factor_matrices], storage_dtype, computation_dtype)
        with DequantizeQuantizedTensorListContext(storage) as factors:
            for (dim, _), factor in zip(self._preconditioned(), factors.dequantized_value):
                if beta2 != 1.0:
                    factor.mul_(beta2)
                if grad.dim() == 2:  # a matrix product without tensordot's transposed copy
                    unfolded = grad if dim == 0 else grad.T
                    factor.addmm_(unfolded, unfolded.T, alpha=weight)
                else:
                    others = [other for other in dims if other != dim]
                    factor.add_(torch.tensordot(grad, grad, dims=(others, others)), alpha=weight)

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
                results = self._compute(index, matrix, exponent, epsilon)
            except (RuntimeError, ArithmeticError) as error:
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

    def _compute(self, index: int, matrix: torch.Tensor, exponent: float, epsilon: float) -> tuple[torch.Tensor, ...]:
        """The amortized results of bias-corrected factor ``index`` (``_store`` keeps them)."""
        raise NotImplementedError

    def _store(self, index: int, results: tuple[torch.Tensor, ...]) -> None:
        raise NotImplementedError

    def precondition(self, grad: torch.Tensor, epsilon: float, bias_correction2: float) -> torch.Tensor:
        """The preconditioned direction of ``grad`` (a new tensor)."""
        raise NotImplementedError


class RootInvShampooPreconditioner(ShampooPreconditioner):
    """Keeps each factor's inverse root: ``{"factor_matrices": {0: L, ...}, "inv_factor_matrices":
    {0: L^(-e), ...}}``. The roots start as identities, as in the reference, so a block whose first
    computation failed is not preconditioned."""

    def __init__(self, block_info: BlockInfo, block_shape: tuple[int, ...], config: RootInvShampooPreconditionerConfig) -> None:
        super().__init__(block_info, block_shape, config)
        dtype = config.inv_factor_matrix_dtype or block_info.param.dtype
        self._root_config: RootInvConfig = config.amortized_computation_config
        if isinstance(self._root_config, CoupledNewtonConfig) and any(
            abs(1.0 / exponent - round(1.0 / exponent)) > 1e-12 for _, exponent in self._preconditioned()
        ):
            raise ValueError(
                f"CoupledNewtonConfig computes integer roots only; a block of order {len(block_shape)} has the exponents "
                f"{[exponent for _, exponent in self._preconditioned()]}"
            )
        roots = [Fraction(1.0 / exponent) for _, exponent in self._preconditioned()]
        if isinstance(self._root_config, CoupledHigherOrderConfig) and (
            large := [str(root) for root in roots if max(abs(root.numerator), root.denominator) > _MAX_ROOT_TERM]
        ):
            # The iteration takes matrix powers of the root's numerator and denominator.
            raise ValueError(
                f"CoupledHigherOrderConfig needs roots p/q with p, q <= {_MAX_ROOT_TERM}; a block of order "
                f"{len(block_shape)} has the roots {large}"
            )
        self.inv_factor_matrices: tuple[torch.Tensor, ...] = tuple(
            block_info.allocate_eye_tensor(n=size, dtype=dtype, device=block_info.param.device) for size in self._sizes(block_shape)
        )

    def _compute(self, index: int, matrix: torch.Tensor, exponent: float, epsilon: float) -> tuple[torch.Tensor, ...]:
        config = self._root_config
        if isinstance(config, CoupledNewtonConfig):
            return (coupled_newton_inverse_root(matrix, round(1.0 / exponent), epsilon, config),)
        if isinstance(config, CoupledHigherOrderConfig):  # regularised by its own epsilons, as in the reference
            return (coupled_higher_order_inverse_root(matrix, Fraction(1.0 / exponent), config),)
        return (matrix_inverse_root(matrix, exponent, epsilon, config),)  # pyre-ignore[6]: an EigenConfig (the config checks)

    def _store(self, index: int, results: tuple[torch.Tensor, ...]) -> None:
        self.inv_factor_matrices[index].copy_(results[0])

    def precondition(self, grad: torch.Tensor, epsilon: float, bias_correction2: float) -> torch.Tensor:
        roots = {dim: root.to(grad.dtype) for (dim, _), root in zip(self._preconditioned(), self.inv_factor_matrices)}
        return along_dims(grad, roots)  # the roots are symmetric


class EigendecomposedShampooPreconditioner(ShampooPreconditioner):
    """Keeps each factor's eigendecomposition: ``{"factor_matrices": ..., "factor_matrices_eigenvectors":
    {0: Q, ...}, "factor_matrices_eigenvalues": {0: l, ...}}`` (of ``L + epsilon I`` by default,
    in the parameter's dtype; identities and ones at first, as in the reference), and forms
    ``Q diag(stabilized l^(-e)) Q^T`` at every step."""

    def __init__(self, block_info: BlockInfo, block_shape: tuple[int, ...], config: EigendecomposedShampooPreconditionerConfig) -> None:
        super().__init__(block_info, block_shape, config)
        dtype, device = block_info.param.dtype, block_info.param.device
        self._eigen: EigendecompositionConfig = config.amortized_computation_config
        sizes = self._sizes(block_shape)
        self.factor_matrices_eigenvectors: tuple[torch.Tensor, ...] = tuple(
            block_info.allocate_eye_tensor(n=size, dtype=dtype, device=device) for size in sizes
        )
        self.factor_matrices_eigenvalues: tuple[torch.Tensor, ...] = tuple(
            block_info.allocate_ones_tensor(size=(size,), dtype=dtype, device=device) for size in sizes
        )

    def _compute(self, index: int, matrix: torch.Tensor, exponent: float, epsilon: float) -> tuple[torch.Tensor, ...]:
        return eigendecomposition(matrix, epsilon, self._eigen, self.factor_matrices_eigenvectors[index])

    def _store(self, index: int, results: tuple[torch.Tensor, ...]) -> None:
        self.factor_matrices_eigenvalues[index].copy_(results[0])
        self.factor_matrices_eigenvectors[index].copy_(results[1])

    def precondition(self, grad: torch.Tensor, epsilon: float, bias_correction2: float) -> torch.Tensor:
        roots = {
            dim: ((eigenvectors * stabilized_power(eigenvalues, exponent, epsilon, self._eigen)) @ eigenvectors.T).to(grad.dtype)
            for eigenvectors, eigenvalues, (dim, exponent) in zip(
                self.factor_matrices_eigenvectors, self.factor_matrices_eigenvalues, self._preconditioned()
            )
        }
        return along_dims(grad, roots)


class EigenvalueCorrectedShampooPreconditioner(ShampooPreconditioner):
    """Eigenvalue-corrected Shampoo (SOAP): ``{"factor_matrices": ..., "factor_matrices_eigenvectors":
    {0: Q, ...}, "corrected_eigenvalues": C}``. The eigenvectors of the factors (identities at
    first) are recomputed every ``precondition_frequency`` steps; every step, the gradient rotated
    into their basis, ``G~ = G x_i Q_i``, updates ``C = beta2 C + (1 - beta2) G~^2`` (block-shaped,
    the parameter's dtype), and the direction is ``(M~ / ((C / c)^e + epsilon)) x_i Q_i^T``, an
    Adam step in the eigenbasis."""

    def __init__(self, block_info: BlockInfo, block_shape: tuple[int, ...], config: EigenvalueCorrectedShampooPreconditionerConfig) -> None:
        super().__init__(block_info, block_shape, config)
        dtype, device = block_info.param.dtype, block_info.param.device
        self._eigen: EigendecompositionConfig = config.amortized_computation_config
        self._exponent: float = float(config.inverse_exponent_override.get(len(block_shape), 0.5))
        self.factor_matrices_eigenvectors: tuple[torch.Tensor, ...] = tuple(
            block_info.allocate_eye_tensor(n=size, dtype=dtype, device=device) for size in self._sizes(block_shape)
        )
        self.corrected_eigenvalues: torch.Tensor = block_info.allocate_zeros_tensor(size=block_shape, dtype=dtype, device=device)

    def _preconditioned(self) -> list[tuple[int, float]]:
        config = self._config
        if not isinstance(config, EigenvalueCorrectedShampooPreconditionerConfig):
            raise NotImplementedError
        ignored = set(config.ignored_basis_change_dims.get(self._order, ()))
        return [(dim, 1.0) for dim in range(self._order) if dim not in ignored]

    def update(self, grad: torch.Tensor, beta2: float, epsilon: float, bias_correction2: float, amortize: bool) -> None:
        """The factors, then (when ``amortize``) their eigenvectors, then the corrected eigenvalues
        from the gradient in the (new) eigenbasis, as the reference orders them."""
        super().update(grad, beta2, epsilon, bias_correction2, amortize)
        rotated = self._rotate(grad.to(self.corrected_eigenvalues.dtype), back=False)
        if beta2 != 1.0:
            self.corrected_eigenvalues.mul_(beta2).addcmul_(rotated, rotated, value=1.0 - beta2)
        else:
            self.corrected_eigenvalues.addcmul_(rotated, rotated)

    def _rotate(self, tensor: torch.Tensor, back: bool) -> torch.Tensor:
        """``tensor x_i Q_i`` into the eigenbasis, or ``x_i Q_i^T`` back out of it."""
        basis = {
            dim: (eigenvectors.T if back else eigenvectors).to(tensor.dtype)
            for (dim, _), eigenvectors in zip(self._preconditioned(), self.factor_matrices_eigenvectors)
        }
        return along_dims(tensor, basis)

    def _compute(self, index: int, matrix: torch.Tensor, exponent: float, epsilon: float) -> tuple[torch.Tensor, ...]:
        return eigendecomposition(matrix, epsilon, self._eigen, self.factor_matrices_eigenvectors[index])[1:]

    def _store(self, index: int, results: tuple[torch.Tensor, ...]) -> None:
        self.factor_matrices_eigenvectors[index].copy_(results[0])

    def precondition(self, grad: torch.Tensor, epsilon: float, bias_correction2: float) -> torch.Tensor:
        # As the reference (and torch's Adam): the root of the bias-corrected eigenvalues, then epsilon.
        scale = self.corrected_eigenvalues.div(bias_correction2).pow_(self._exponent).add_(epsilon)
        rotated = self._rotate(grad, back=False)
        return self._rotate(rotated / scale.to(rotated.dtype), back=True)


def shampoo_preconditioner(block_info: BlockInfo, block_shape: tuple[int, ...], config: AmortizedPreconditionerConfig) -> ShampooPreconditioner:
    """The preconditioner ``config`` asks for (root-inverse, eigendecomposed or eigenvalue-corrected
    Shampoo).

    Raises:
        ValueError: Another preconditioner config (not implemented).
    """
    if isinstance(config, RootInvShampooPreconditionerConfig):
        return RootInvShampooPreconditioner(block_info, block_shape, config)
    if isinstance(config, EigendecomposedShampooPreconditionerConfig):
        return EigendecomposedShampooPreconditioner(block_info, block_shape, config)
    if isinstance(config, EigenvalueCorrectedShampooPreconditionerConfig):
        return EigenvalueCorrectedShampooPreconditioner(block_info, block_shape, config)
    raise ValueError(f"preconditioner_config {type(config).__name__} is not implemented")
