# pyre-strict
"""Single-process behaviour of ``DistributedShampoo`` against explicit matrix formulas."""

import dataclasses
import math
from fractions import Fraction
import warnings
from collections.abc import Sequence
import unittest
from dataclasses import dataclass

import torch
from parameterized import parameterized

from distributed_shampoo import (
    AdaGradGraftingConfig,
    AdaGradPreconditionerConfig,
    AdamGraftingConfig,
    AdamPreconditionerConfig,
    CoupledHigherOrderConfig,
    CoupledNewtonConfig,
    DDPDistributedConfig,
    DefaultShampooConfig,
    DefaultSingleDeviceDistributedConfig,
    DefaultSOAPConfig,
    DistributedShampoo,
    FullyShardDistributedConfig,
    GraftingConfig,
    RMSpropGraftingConfig,
    RMSpropPreconditionerConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenConfig,
    EigendecompositionConfig,
    EighEigendecompositionConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    NewtonSchulzOrthogonalizationConfig,
    PerturbationConfig,
    PreconditionerConfig,
    PreconditionerValueError,
    PseudoInverseConfig,
    QREigendecompositionConfig,
    RootInvShampooPreconditionerConfig,
    SGDGraftingConfig,
    SGDPreconditionerConfig,
    ShampooPT2CompileConfig,
    SignDescentPreconditionerConfig,
    SingleDeviceDistributedConfig,
    SpectralDescentPreconditionerConfig,
    SVDOrthogonalizationConfig,
)
from distributed_shampoo.preconditioner.shampoo_preconditioner import (
    coupled_higher_order_inverse_root,
    coupled_newton_inverse_root,
    matrix_inverse_root,
)
from distributed_shampoo.shampoo_types import HYPERPARAMETERS
from distributed_shampoo.utils.shampoo_checkpoint_utils import decode_key, unflatten


def explicit_root(matrix: torch.Tensor, root: int, epsilon: float) -> torch.Tensor:
    """``(matrix + epsilon I)^(-1/root)`` through float64 eigh, written out independently (eigenvalues
    below epsilon shifted up together, as the reference's default ``PerturbationConfig`` does)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix.double() + epsilon * torch.eye(matrix.shape[0], dtype=torch.float64))
    shift = max(epsilon - float(eigenvalues.min()), 0.0)
    return eigenvectors @ torch.diag((eigenvalues + shift) ** (-1.0 / root)) @ eigenvectors.T


@dataclass(frozen=True)
class Setting:
    """Hyperparameters of one reference run on a single 2-D block."""

    lr: float = 0.1
    beta1: float = 0.0
    beta2: float = 1.0
    beta3: float = -1.0
    epsilon: float = 1e-2
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    decoupled: bool = True
    nesterov: bool = False
    bias_correction: bool = True
    frequency: int = 1
    start: int = 1
    grafting: GraftingConfig | None = None
    steps: int = 5

    def optimizer(
        self, params: list[torch.Tensor], max_preconditioner_dim: int = 1024, preconditioner_dtype: torch.dtype = torch.float32
    ) -> DistributedShampoo:
        return DistributedShampoo(
            params,
            lr=self.lr,
            betas=(self.beta1, self.beta2),
            beta3=self.beta3,
            epsilon=self.epsilon,
            momentum=self.momentum,
            dampening=self.dampening,
            weight_decay=self.weight_decay,
            max_preconditioner_dim=max_preconditioner_dim,
            precondition_frequency=self.frequency,
            start_preconditioning_step=self.start,
            use_nesterov=self.nesterov,
            use_bias_correction=self.bias_correction,
            use_decoupled_weight_decay=self.decoupled,
            grafting_config=self.grafting,
            preconditioner_dtype=preconditioner_dtype,
        )


def reference_trajectory(setting: Setting, weight: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """The class docstring's algorithm for one 2-D block, in float64 with explicit L and R."""
    s = setting
    w = weight.double()
    m, n = w.shape
    left, right = torch.zeros(m, m, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    root_left, root_right = torch.zeros_like(left), torch.zeros_like(right)
    filtered, momentum, accumulator = torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(w)
    for t, grad in enumerate(grads, start=1):
        g = grad.double()
        if s.weight_decay and not s.decoupled:
            g = g + s.weight_decay * w
        keep = s.beta2 if s.beta2 < 1 else 1.0
        new = 1.0 - s.beta2 if s.beta2 < 1 else 1.0
        left, right = keep * left + new * g @ g.T, keep * right + new * g.T @ g
        grafting = s.grafting
        if isinstance(grafting, AdaGradPreconditionerConfig):
            accumulator = accumulator + g * g
        elif isinstance(grafting, (RMSpropPreconditionerConfig, AdamPreconditionerConfig)):
            accumulator = grafting.beta2 * accumulator + (1 - grafting.beta2) * g * g
        beta3 = s.beta1 if s.beta3 == -1 else s.beta3
        current = beta3 * filtered + (1 - beta3) * g if s.beta1 else g
        filtered = s.beta1 * filtered + (1 - s.beta1) * g if s.beta1 else g
        corrected = current / (1 - beta3 * s.beta1 ** (t - 1)) if s.bias_correction and s.beta1 else current
        if t == s.start or (t > s.start and t % s.frequency == 0):  # the reference's schedule
            c = 1 - s.beta2**t if s.bias_correction and s.beta2 < 1 else 1.0
            root_left, root_right = explicit_root(left / c, 4, s.epsilon), explicit_root(right / c, 4, s.epsilon)
        if isinstance(grafting, AdaGradPreconditionerConfig):
            grafted = corrected / (accumulator.sqrt() + grafting.epsilon)
        elif isinstance(grafting, RMSpropPreconditionerConfig):
            grafted = corrected / (accumulator.sqrt() + grafting.epsilon)
        elif isinstance(grafting, AdamPreconditionerConfig):
            grafted = corrected / ((accumulator / (1 - grafting.beta2**t)).sqrt() + grafting.epsilon)
        else:
            grafted = corrected
        if t >= s.start:
            direction = root_left @ corrected @ root_right
            if grafting is not None:
                direction = direction * grafted.norm() / (direction.norm() + 1e-16)
        else:
            direction = grafted
        if s.weight_decay and s.decoupled:
            direction = direction + s.weight_decay * w
        if s.momentum:
            momentum = s.momentum * momentum + (1 - s.dampening) * direction
            direction = (1 - s.dampening) * direction + s.momentum * momentum if s.nesterov else momentum
        w = w - s.lr * direction
    return w


def random_grads(shape: tuple[int, ...], steps: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


def run(optimizer: DistributedShampoo, params: Sequence[torch.Tensor], grads: Sequence[Sequence[torch.Tensor | None]]) -> None:
    """Sets each parameter's gradient and steps, once per entry of ``grads``."""
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = None if grad is None else grad.clone()
        optimizer.step()


class ExactMathTest(unittest.TestCase):
    def test_one_step_is_left_and_right_inverse_fourth_roots(self) -> None:
        # 6 * 10 > max_preconditioner_dim = 16 >= max(6, 10): the dimensions are not merged.
        generator = torch.Generator().manual_seed(1)
        weight = torch.nn.Parameter(torch.randn(6, 10, generator=generator))
        grad = torch.randn(6, 10, generator=generator)
        initial = weight.detach().double().clone()
        optimizer = DistributedShampoo(
            [weight], lr=0.5, betas=(0.0, 1.0), epsilon=1e-3, max_preconditioner_dim=16,
            precondition_frequency=1, start_preconditioning_step=1,
        )
        weight.grad = grad.clone()
        optimizer.step()
        g = grad.double()
        expected = initial - 0.5 * explicit_root(g @ g.T, 4, 1e-3) @ g @ explicit_root(g.T @ g, 4, 1e-3)
        torch.testing.assert_close(weight.detach().double(), expected, rtol=1e-5, atol=1e-6)

    def test_blocked_parameter_equals_each_block_on_its_own(self) -> None:
        # (8, 12) with max_preconditioner_dim=5: blocks of rows [0:5, 5:8] x columns [0:5, 5:10, 10:12].
        generator = torch.Generator().manual_seed(2)
        weight = torch.nn.Parameter(torch.randn(8, 12, generator=generator))
        initial = weight.detach().clone()
        grads = random_grads((8, 12), steps=3, seed=3)
        setting = Setting(beta1=0.9, beta2=0.99, epsilon=1e-3, momentum=0.5)
        optimizer = setting.optimizer([weight], max_preconditioner_dim=5)
        run(optimizer, [weight], [[grad] for grad in grads])
        self.assertEqual(len([key for key in optimizer.state[weight] if key.startswith("block_")]), 6)
        for rows in (slice(0, 5), slice(5, 8)):
            for columns in (slice(0, 5), slice(5, 10), slice(10, 12)):
                expected = reference_trajectory(setting, initial[rows, columns], [grad[rows, columns] for grad in grads])
                torch.testing.assert_close(weight.detach()[rows, columns].double(), expected, rtol=1e-4, atol=1e-5)

    def test_third_order_block_is_the_kronecker_product_of_its_roots(self) -> None:
        # (3, 4, 5) with max_preconditioner_dim=5: nothing merges (4 * 5 > 5), one block of order 3.
        generator = torch.Generator().manual_seed(4)
        weight = torch.nn.Parameter(torch.zeros(3, 4, 5))
        grad = torch.randn(3, 4, 5, generator=generator)
        optimizer = DistributedShampoo(
            [weight], lr=1.0, betas=(0.0, 1.0), epsilon=1e-2, max_preconditioner_dim=5, start_preconditioning_step=1
        )
        weight.grad = grad.clone()
        optimizer.step()
        g = grad.double()
        roots = [explicit_root(unfolded @ unfolded.T, 6, 1e-2) for unfolded in (g.reshape(3, 20), g.permute(1, 0, 2).reshape(4, 15), g.permute(2, 0, 1).reshape(5, 12))]
        kronecker = torch.kron(torch.kron(roots[0], roots[1]), roots[2])
        expected = -(kronecker @ g.reshape(-1)).reshape(3, 4, 5)
        torch.testing.assert_close(weight.detach().double(), expected, rtol=1e-5, atol=1e-6)

    def test_matrix_inverse_root_shifts_eigenvalues_below_epsilon(self) -> None:
        # A factor that rounding (here: 1e-3 on purpose) made indefinite: eigenvalues 14 - 1e-3,
        # -1e-3, -1e-3. Plus epsilon 1e-4 the smallest is -9e-4; all shift by 1e-3, so the root is
        # that of 14 (on v) and 1e-4 (orthogonal to it).
        vector = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
        indefinite = vector @ vector.T - 1e-3 * torch.eye(3, dtype=torch.float64)
        root = matrix_inverse_root(indefinite, 0.5, 1e-4)
        expected = explicit_root(vector @ vector.T, 2, 1e-4)
        torch.testing.assert_close(root, expected, rtol=1e-10, atol=1e-10)
        # Perturbed after the decomposition: eigenvalues 14 - 1e-3, -1e-3, -1e-3 shift by 1e-3 to
        # 14, 0, 0, then epsilon is added: the same root here.
        after = EigenConfig(rank_deficient_stability_config=PerturbationConfig(perturb_before_computation=False))
        torch.testing.assert_close(matrix_inverse_root(indefinite, 0.5, 1e-4, after), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(root @ root @ (vector @ vector.T + 1e-4 * torch.eye(3, dtype=torch.float64)), torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-9)

    @parameterized.expand([("relative_n_eps", PseudoInverseConfig(rank_rtol=None)), ("absolute", PseudoInverseConfig(rank_atol=1e-8))])
    def test_pseudo_inverse_root_leaves_the_null_space_at_zero(self, _name: str, stability: PseudoInverseConfig) -> None:
        # A rank-2 factor B B^T (B 5 x 2) = U diag(s^2) U^T: its pseudo-inverse 4th root is
        # U diag(s^-1/2) U^T over the two nonzero singular values, nothing added; the three
        # eigenvalues that rounding leaves near 0 fall below either cutoff.
        basis = torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        u, singular, _ = torch.linalg.svd(basis, full_matrices=False)
        config = EigenConfig(rank_deficient_stability_config=stability)
        root = matrix_inverse_root(basis @ basis.T, 0.25, 0.0, config)
        torch.testing.assert_close(root, u @ torch.diag(singular**-0.5) @ u.T, rtol=1e-9, atol=1e-9)
        with self.assertRaisesRegex(ValueError, r"epsilon=0.001 should be 0.0 when using pseudo-inverse!"):
            matrix_inverse_root(basis @ basis.T, 0.25, 1e-3, config)


def _one_matrix_step(weight: torch.nn.Parameter, grad: torch.Tensor, config: RootInvShampooPreconditionerConfig) -> torch.Tensor:
    """The weight after one preconditioned step (lr 1, no filtering, epsilon 1e-2) of a matrix kept whole."""
    optimizer = DistributedShampoo(
        [weight], lr=1.0, betas=(0.0, 1.0), epsilon=1e-2, max_preconditioner_dim=max(weight.shape), start_preconditioning_step=1,
        preconditioner_config=config,
    )
    weight.grad = grad.clone()
    optimizer.step()
    return weight.detach()


def _explicit_matrix_step(grad: torch.Tensor, root: int) -> torch.Tensor:
    """``-(G G^T + eps I)^(-1/root) G (G^T G + eps I)^(-1/root)`` from zero, eps 1e-2."""
    return -explicit_root(grad @ grad.T, root, 1e-2) @ grad @ explicit_root(grad.T @ grad, root, 1e-2)


@dataclass(frozen=True, kw_only=True)
class PseudoInverseLikeConfig(EigendecompositionConfig):
    """An eigendecomposition this package does not implement."""


class PreconditionerConfigTest(unittest.TestCase):
    def test_inverse_exponent_override_per_dimension(self) -> None:
        # Order 3 with {0: 0.0, 1: 0.25}: dimension 0 is not preconditioned (no factor), dimension 1
        # takes the 4th root, dimension 2 the default 6th.
        generator = torch.Generator().manual_seed(9)
        weight = torch.nn.Parameter(torch.zeros(3, 4, 5, dtype=torch.float64))
        grad = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
        config = RootInvShampooPreconditionerConfig(factor_matrix_dtype=torch.float64, inverse_exponent_override={3: {0: 0.0, 1: 0.25}})
        optimizer = DistributedShampoo(
            [weight], lr=1.0, betas=(0.0, 1.0), epsilon=1e-2, max_preconditioner_dim=5, start_preconditioning_step=1,
            preconditioner_config=config,
        )
        weight.grad = grad.clone()
        optimizer.step()
        shampoo = optimizer.state[weight]["block_0"]["shampoo"]
        self.assertEqual([tuple(f.shape) for f in shampoo["factor_matrices"].values()], [(4, 4), (5, 5)])
        right = explicit_root(grad.permute(1, 0, 2).reshape(4, 15) @ grad.permute(1, 0, 2).reshape(4, 15).T, 4, 1e-2)
        last = explicit_root(grad.permute(2, 0, 1).reshape(5, 12) @ grad.permute(2, 0, 1).reshape(5, 12).T, 6, 1e-2)
        expected = -torch.einsum("abc,bj,ck->ajk", grad, right, last)
        torch.testing.assert_close(weight.detach(), expected, rtol=1e-10, atol=1e-12)

    def test_inverse_exponent_override_for_an_order(self) -> None:
        # {2: 0.2}: both dimensions of a matrix take the 5th root.
        generator = torch.Generator().manual_seed(10)
        weight = torch.nn.Parameter(torch.zeros(4, 6, dtype=torch.float64))
        grad = torch.randn(4, 6, generator=generator, dtype=torch.float64)
        config = RootInvShampooPreconditionerConfig(factor_matrix_dtype=torch.float64, inverse_exponent_override={2: 0.2})
        torch.testing.assert_close(_one_matrix_step(weight, grad, config), _explicit_matrix_step(grad, 5), rtol=1e-10, atol=1e-12)

    @parameterized.expand([("order_2_is_newton", 2, Fraction(4)), ("order_3", 3, Fraction(4)), ("order_5_root_3_halves", 5, Fraction(3, 2))])
    def test_coupled_higher_order_roots(self, _name: str, order: int, root: Fraction) -> None:
        # (A + 1e-2 I)^(-1/root), regularised by the config's own abs_epsilon, against float64 eigh.
        grad = torch.randn(5, 8, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
        config = CoupledHigherOrderConfig(rel_epsilon=0.0, abs_epsilon=1e-2, tolerance=1e-12, order=order)
        eigenvalues, eigenvectors = torch.linalg.eigh(grad @ grad.T + 1e-2 * torch.eye(5, dtype=torch.float64))
        expected = eigenvectors @ torch.diag(eigenvalues ** (-1.0 / float(root))) @ eigenvectors.T
        torch.testing.assert_close(coupled_higher_order_inverse_root(grad @ grad.T, root, config), expected, rtol=1e-9, atol=1e-10)

    def test_coupled_higher_order_in_the_optimizer(self) -> None:
        grad = torch.randn(5, 8, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
        higher_order = CoupledHigherOrderConfig(rel_epsilon=0.0, abs_epsilon=1e-2, tolerance=1e-12)
        config = RootInvShampooPreconditionerConfig(amortized_computation_config=higher_order, factor_matrix_dtype=torch.float64)
        weight = torch.nn.Parameter(torch.zeros(5, 8, dtype=torch.float64))
        torch.testing.assert_close(_one_matrix_step(weight, grad, config), _explicit_matrix_step(grad, 4), rtol=1e-8, atol=1e-10)
        with self.assertRaisesRegex(ArithmeticError, "Input matrix has entries close to inf"):
            coupled_higher_order_inverse_root(torch.full((2, 2), math.inf), Fraction(2), higher_order)
        with self.assertRaisesRegex(
            ValueError, r"CoupledHigherOrderConfig needs roots p/q with p, q <= 100; a block of order 2 has the roots \['7505999378950827/2251799813685248'"
        ):
            DistributedShampoo(
                [torch.nn.Parameter(torch.zeros(5, 8))], max_preconditioner_dim=8,
                preconditioner_config=dataclasses.replace(config, inverse_exponent_override={2: 0.3}),
            )
        with self.assertRaisesRegex(ValueError, "Invalid order: 1. Must be >= 2."):
            CoupledHigherOrderConfig(rel_epsilon=0.0, abs_epsilon=0.0, order=1)

    def test_a_failed_higher_order_root_keeps_the_last_good_one(self) -> None:
        # A rank-1 factor without a regulariser has no inverse root: the iteration does not
        # converge, X^p overflows and the check of A X^p = I gives NaN, an ArithmeticError, which
        # counts as a failed amortized computation; the roots stay the identities they started
        # as, until the failures exceed the tolerance.
        higher_order = CoupledHigherOrderConfig(rel_epsilon=0.0, abs_epsilon=0.0)
        config = RootInvShampooPreconditionerConfig(amortized_computation_config=higher_order, num_tolerated_failed_amortized_computations=1)
        weight = torch.nn.Parameter(torch.zeros(3, 4))
        optimizer = DistributedShampoo([weight], max_preconditioner_dim=4, preconditioner_config=config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "did not converge"
            run(optimizer, [weight], [[torch.ones(3, 4)]])
            roots = optimizer.state[weight]["block_0"]["shampoo"]["inv_factor_matrices"]
            self.assertTrue(torch.equal(roots[0], torch.eye(3)) and torch.equal(roots[1], torch.eye(4)))
            with self.assertRaisesRegex(ValueError, "The number of failed amortized computations of a block exceeded the allowed tolerance"):
                run(optimizer, [weight], [[torch.ones(3, 4)]])

    def test_coupled_newton_roots(self) -> None:
        # The iteration converges to the eigendecomposition's root (to its tolerance), and the
        # optimizer computes its roots with it.
        generator = torch.Generator().manual_seed(15)
        grad = torch.randn(5, 8, generator=generator, dtype=torch.float64)
        newton = CoupledNewtonConfig(tolerance=1e-12)
        root = coupled_newton_inverse_root(grad @ grad.T, 4, 1e-2, newton)
        torch.testing.assert_close(root, explicit_root(grad @ grad.T, 4, 1e-2), rtol=1e-9, atol=1e-10)
        weight = torch.nn.Parameter(torch.zeros(5, 8, dtype=torch.float64))
        config = RootInvShampooPreconditionerConfig(amortized_computation_config=newton, factor_matrix_dtype=torch.float64)
        torch.testing.assert_close(_one_matrix_step(weight, grad, config), _explicit_matrix_step(grad, 4), rtol=1e-8, atol=1e-10)
        with self.assertRaisesRegex(ValueError, "CoupledNewtonConfig computes integer roots only"):
            DistributedShampoo(
                [torch.nn.Parameter(torch.zeros(5, 8))], max_preconditioner_dim=8,
                preconditioner_config=dataclasses.replace(config, inverse_exponent_override={2: 0.3}),
            )

    def test_dtypes_of_factors_and_roots(self) -> None:
        weight = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.bfloat16))
        cases = [
            (RootInvShampooPreconditionerConfig(), None, torch.float32, torch.bfloat16),  # the reference's: roots in the parameter's dtype
            (RootInvShampooPreconditionerConfig(factor_matrix_dtype=torch.float64, inv_factor_matrix_dtype=torch.float32), None, torch.float64, torch.float32),
            (RootInvShampooPreconditionerConfig(), torch.float16, torch.float16, torch.float16),  # preconditioner_dtype sets both
        ]
        for config, shorthand, factor_dtype, root_dtype in cases:
            optimizer = DistributedShampoo([weight], preconditioner_config=config, preconditioner_dtype=shorthand)
            shampoo = optimizer.state[weight]["block_0"]["shampoo"]
            self.assertEqual((shampoo["factor_matrices"][0].dtype, shampoo["inv_factor_matrices"][0].dtype), (factor_dtype, root_dtype))
            # The roots start as identities, as in the reference.
            self.assertTrue(torch.equal(shampoo["inv_factor_matrices"][0], torch.eye(6, dtype=root_dtype)))  # (3, 2) merges to (6,)

    def test_failed_root_computations_keep_the_last_roots_until_the_tolerance(self) -> None:
        # Offloading eigh to the meta device makes every decomposition fail (its result cannot
        # come back): two failures in a row are tolerated, the roots stay the identities, so the
        # step is the filtered gradient itself; the third failure raises.
        eigen = EigenConfig(eigendecomposition_offload_device="meta")
        config = RootInvShampooPreconditionerConfig(amortized_computation_config=eigen, num_tolerated_failed_amortized_computations=2)
        weight = torch.nn.Parameter(torch.zeros(2, 3))
        optimizer = DistributedShampoo([weight], lr=1.0, betas=(0.0, 1.0), start_preconditioning_step=1, preconditioner_config=config)
        for step in (1, 2):
            weight.grad = torch.ones(2, 3)
            optimizer.step()
            self.assertTrue(torch.equal(weight.detach(), torch.full((2, 3), -float(step))))
        weight.grad = torch.ones(2, 3)
        with self.assertRaisesRegex(ValueError, r"exceeded the allowed tolerance \(2\)"):
            optimizer.step()

    def test_eigendecomposed_takes_the_root_inverse_trajectory(self) -> None:
        # The same roots, kept as eigendecompositions of L / c + epsilon I and formed at every step.
        grads = random_grads((6, 10), steps=6, seed=11)
        runs = []
        for config in (
            RootInvShampooPreconditionerConfig(factor_matrix_dtype=torch.float64),
            EigendecomposedShampooPreconditionerConfig(factor_matrix_dtype=torch.float64),
        ):
            weight = torch.nn.Parameter(torch.ones(6, 10, dtype=torch.float64))
            optimizer = DistributedShampoo(
                [weight], lr=0.1, betas=(0.9, 0.99), epsilon=1e-3, momentum=0.5, max_preconditioner_dim=4,
                precondition_frequency=2, grafting_config=AdaGradGraftingConfig(), preconditioner_config=config,
            )
            run(optimizer, [weight], [[grad.double()] for grad in grads])
            runs.append((weight.detach().clone(), optimizer.state[weight]["block_0"]["shampoo"]))
        torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-10, atol=1e-12)
        shampoo = runs[1][1]
        self.assertEqual(sorted(shampoo), ["factor_matrices", "factor_matrices_eigenvalues", "factor_matrices_eigenvectors"])
        # Step 6 computed them: the eigenvalues of L / (1 - 0.99^6) + epsilon I.
        factor = shampoo["factor_matrices"][0]
        expected = torch.linalg.eigvalsh(factor / (1 - 0.99**6) + 1e-3 * torch.eye(4, dtype=torch.float64))
        torch.testing.assert_close(shampoo["factor_matrices_eigenvalues"][0], expected, rtol=1e-12, atol=1e-14)

    def test_eigenvalue_corrected_shampoo_is_adam_in_the_eigenbasis(self) -> None:
        # SOAP, written out in float64 for a (4, 3) block, betas (0, 0.9), frequency 2: the factors'
        # eigenvectors Q0, Q1 (of L / c + eps I, eigh), recomputed at steps 1 and 3; every step
        # C = 0.9 C + 0.1 (Q0^T G Q1)^2, then W -= lr Q0 ((Q0^T G Q1) / (sqrt(C / c) + eps)) Q1^T.
        grads = [grad.double() for grad in random_grads((4, 3), steps=4, seed=13)]
        weight = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
        config = EigenvalueCorrectedShampooPreconditionerConfig(factor_matrix_dtype=torch.float64)
        optimizer = DistributedShampoo(
            [weight], lr=0.1, betas=(0.0, 0.9), epsilon=1e-8, max_preconditioner_dim=4, precondition_frequency=2,
            start_preconditioning_step=2, preconditioner_config=config,
        )
        run(optimizer, [weight], [[grad] for grad in grads])
        expected = torch.zeros(4, 3, dtype=torch.float64)
        left, right, corrected = torch.zeros(4, 4, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64)
        q0, q1 = torch.eye(4, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
        for step, grad in enumerate(grads, start=1):
            left, right = 0.9 * left + 0.1 * grad @ grad.T, 0.9 * right + 0.1 * grad.T @ grad
            c = 1 - 0.9**step
            if step in (2, 4):  # the first preconditioned step, then every multiple of 2
                q0 = torch.linalg.eigh(left / c + 1e-8 * torch.eye(4, dtype=torch.float64))[1]
                q1 = torch.linalg.eigh(right / c + 1e-8 * torch.eye(3, dtype=torch.float64))[1]
            rotated = q0.T @ grad @ q1
            corrected = 0.9 * corrected + 0.1 * rotated * rotated
            direction = q0 @ (rotated / ((corrected / c).sqrt() + 1e-8)) @ q1.T if step >= 2 else grad
            expected -= 0.1 * direction
        torch.testing.assert_close(weight.detach(), expected, rtol=1e-10, atol=1e-12)
        shampoo = optimizer.state[weight]["block_0"]["shampoo"]
        self.assertEqual(sorted(shampoo), ["corrected_eigenvalues", "factor_matrices", "factor_matrices_eigenvectors"])

    def test_soap_qr_iteration_and_ignored_dims(self) -> None:
        # DefaultSOAPConfig: one QR step from the last eigenvectors per computation; with
        # ignored_basis_change_dims {2: [1]} dimension 1 has no factor and is not rotated.
        weight = torch.nn.Parameter(torch.zeros(4, 3))
        config = dataclasses.replace(DefaultSOAPConfig, ignored_basis_change_dims={2: [1]})
        optimizer = DistributedShampoo([weight], max_preconditioner_dim=4, preconditioner_config=config)
        for grad in random_grads((4, 3), steps=3, seed=14):
            weight.grad = grad
            optimizer.step()
        shampoo = optimizer.state[weight]["block_0"]["shampoo"]
        self.assertEqual([tuple(f.shape) for f in shampoo["factor_matrices"].values()], [(4, 4)])
        eigenvectors = shampoo["factor_matrices_eigenvectors"][0]
        torch.testing.assert_close(eigenvectors.T @ eigenvectors, torch.eye(4), rtol=0, atol=1e-5)  # still orthonormal
        self.assertTrue(torch.isfinite(weight).all())

    def test_sign_descent_steps_by_the_scaled_signs(self) -> None:
        # Step 1 with beta1 0.9, bias-corrected: m = g, so W = -lr * sign(g) * sum|g|.
        grad = torch.tensor([[1.5, -0.5, 0.0], [-2.0, 0.25, 3.0]])
        weight = torch.nn.Parameter(torch.zeros(2, 3))
        with self.assertWarnsRegex(UserWarning, "precondition_frequency have no effect with SignDescentPreconditionerConfig"):
            optimizer = DistributedShampoo(
                [weight], lr=0.1, betas=(0.9, 0.999), precondition_frequency=10,
                preconditioner_config=SignDescentPreconditionerConfig(scale_fn=lambda g: g.abs().sum()),
            )
        self.assertEqual(optimizer.param_groups[0]["precondition_frequency"], 1)
        weight.grad = grad.clone()
        optimizer.step()
        torch.testing.assert_close(weight.detach(), -0.1 * torch.sign(grad) * grad.abs().sum(), rtol=1e-6, atol=0.0)
        self.assertEqual(sorted(optimizer.state[weight]["block_0"]), ["filtered_grad"])  # no preconditioner state

    @parameterized.expand([("svd", True), ("newton_schulz", False)])
    def test_spectral_descent_orthogonalizes_the_block(self, _name: str, svd: bool) -> None:
        generator = torch.Generator().manual_seed(12)
        grad = torch.randn(6, 4, generator=generator, dtype=torch.float64)
        weight = torch.nn.Parameter(torch.zeros(6, 4, dtype=torch.float64))
        orthogonalization = SVDOrthogonalizationConfig() if svd else NewtonSchulzOrthogonalizationConfig(num_iterations=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the hyperparameters without effect, and the target dimensionality
            optimizer = DistributedShampoo(
                [weight], lr=1.0, betas=(0.0, 1.0), max_preconditioner_dim=math.inf,
                preconditioner_config=SpectralDescentPreconditionerConfig(orthogonalization_config=orthogonalization),
            )
        weight.grad = grad.clone()
        optimizer.step()
        if svd:
            left, _, right = torch.linalg.svd(grad, full_matrices=False)
            expected = left @ right
        else:  # three quintic Newton-Schulz steps on the transposed (wide) orientation, written out
            x = (grad / torch.linalg.matrix_norm(grad)).T
            for _ in range(3):
                x = 3.4445 * x - 4.7750 * (x @ x.T) @ x + 2.0315 * (x @ x.T) @ (x @ x.T) @ x
            expected = x.T
        torch.testing.assert_close(weight.detach(), -expected, rtol=1e-10, atol=1e-12)

    def test_spectral_descent_needs_matrices(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with self.assertRaisesRegex(ValueError, "Spectral descent can only be used for 2D parameters"):
                DistributedShampoo([torch.nn.Parameter(torch.zeros(3))], preconditioner_config=SpectralDescentPreconditionerConfig())

    def test_non_finite_factor_raises(self) -> None:
        weight = torch.nn.Parameter(torch.zeros(2, 2))
        optimizer = DistributedShampoo([weight], start_preconditioning_step=1)
        weight.grad = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
        with self.assertRaisesRegex(PreconditionerValueError, "Encountered nan/inf values in factor matrix 0"):
            optimizer.step()

    @parameterized.expand(
        [
            (lambda: RootInvShampooPreconditionerConfig(num_tolerated_failed_amortized_computations=-1),
             "Invalid num_tolerated_failed_amortized_computations value: -1. Must be >= 0."),
            (lambda: RootInvShampooPreconditionerConfig(factor_matrix_dtype=torch.int32),
             "Invalid factor_matrix_dtype: torch.int32. Must be one of (torch.bfloat16, torch.float16, torch.float32, torch.float64)."),
            (lambda: RootInvShampooPreconditionerConfig(inverse_exponent_override={2: {2: 0.5}}),
             "Invalid dimensions in inverse_exponent_override[2]={2: 0.5}: [2]. All dimensions must be within [0, 1]."),
            (lambda: RootInvShampooPreconditionerConfig(inverse_exponent_override={1: -0.5}),
             "Invalid override value in inverse_exponent_override[1]=-0.5: [-0.5]. All overrides must be >= 0."),
            (lambda: RootInvShampooPreconditionerConfig(inverse_exponent_override={-1: 0.5}),
             "Invalid orders in inverse_exponent_override={-1: 0.5}: [-1]. All orders must be >= 0."),
            (lambda: EigenConfig(tolerance=0.1), "Invalid tolerance value: 0.1. Must be 0.0 for EigenConfig."),
            (lambda: EigenvalueCorrectedShampooPreconditionerConfig(ignored_basis_change_dims={2: [2]}),
             "Invalid dimensions in ignored_basis_change_dims[2]=[2]: [2]. All dimensions must be within [0, 1]."),
            (lambda: DistributedShampoo([torch.nn.Parameter(torch.ones(2))], preconditioner_config=PreconditionerConfig()),
             "DistributedShampoo: preconditioner_config PreconditionerConfig of parameter group 0 is not implemented; use one of "
             "['RootInvShampooPreconditionerConfig', 'EigendecomposedShampooPreconditionerConfig', "
             "'EigenvalueCorrectedShampooPreconditionerConfig', 'SignDescentPreconditionerConfig', "
             "'SpectralDescentPreconditionerConfig']"),
            (lambda: EigendecomposedShampooPreconditionerConfig(amortized_computation_config=PseudoInverseLikeConfig()),
             "Invalid amortized_computation_config: PseudoInverseLikeConfig is not implemented; use EighEigendecompositionConfig or QREigendecompositionConfig"),
        ]
    )
    def test_invalid_preconditioner_config_is_named(self, make: object, message: str) -> None:
        assert callable(make)
        with self.assertRaises(ValueError) as raised:
            make()
        self.assertEqual(str(raised.exception), message)


class AgainstReferenceTest(unittest.TestCase):
    @parameterized.expand(
        [
            ("plain", Setting()),
            ("beta1_bias_corrected", Setting(beta1=0.9)),
            ("beta1_not_bias_corrected", Setting(beta1=0.9, bias_correction=False)),
            ("beta3_nadam_like", Setting(beta1=0.9, beta3=0.81)),
            ("beta3_not_bias_corrected", Setting(beta1=0.9, beta3=0.5, bias_correction=False)),
            ("beta2_ema_bias_corrected", Setting(beta2=0.95)),
            ("beta2_ema_not_bias_corrected", Setting(beta2=0.95, bias_correction=False)),
            ("sgd_grafting", Setting(grafting=SGDPreconditionerConfig(), beta1=0.5)),
            ("adagrad_grafting", Setting(grafting=AdaGradPreconditionerConfig(epsilon=1e-3))),
            ("rmsprop_grafting", Setting(grafting=RMSpropPreconditionerConfig(beta2=0.9, epsilon=1e-3))),
            ("adam_grafting", Setting(grafting=AdamPreconditionerConfig(beta2=0.9, epsilon=1e-3), beta1=0.9)),
            ("grafting_before_start", Setting(grafting=AdaGradPreconditionerConfig(epsilon=1e-3), frequency=2, start=4)),
            ("gradient_before_start", Setting(frequency=3, start=3)),
            ("decoupled_weight_decay", Setting(weight_decay=0.1)),
            ("l2_weight_decay", Setting(weight_decay=0.1, decoupled=False)),
            ("momentum", Setting(momentum=0.9)),
            ("momentum_dampening", Setting(momentum=0.9, dampening=0.3)),
            ("nesterov", Setting(momentum=0.9, nesterov=True)),
            ("nesterov_dampening", Setting(momentum=0.9, dampening=0.3, nesterov=True)),
            # Roots computed at step 7, then at 10 (not at 5): the first preconditioned step uses fresh roots.
            ("start_not_a_multiple_of_frequency", Setting(frequency=5, start=7, steps=11)),
            ("start_not_a_multiple_of_frequency_grafted",
             Setting(frequency=5, start=7, steps=11, beta2=0.9, grafting=AdamPreconditionerConfig(beta2=0.9, epsilon=1e-3))),
            ("everything", Setting(beta1=0.9, beta2=0.99, momentum=0.5, nesterov=True, weight_decay=0.01, frequency=2, start=2,
                                   grafting=AdamPreconditionerConfig(beta2=0.99, epsilon=1e-3))),
        ]
    )
    def test_trajectory_matches_the_reference(self, _name: str, setting: Setting) -> None:
        generator = torch.Generator().manual_seed(5)
        weight = torch.nn.Parameter(torch.randn(6, 4, generator=generator))
        initial = weight.detach().clone()
        grads = random_grads((6, 4), steps=setting.steps, seed=6)
        # 6 * 4 > max_preconditioner_dim = 6: one unmerged 2-D block.
        run(setting.optimizer([weight], max_preconditioner_dim=6), [weight], [[grad] for grad in grads])
        torch.testing.assert_close(weight.detach().double(), reference_trajectory(setting, initial, grads), rtol=1e-4, atol=1e-5)

    def test_float64_factors_follow_the_float64_formula_to_rounding(self) -> None:
        # Float32 factors (the default) agree to ~1e-5 above; stored and updated in float64, to 1e-12.
        setting = Setting(beta1=0.9, beta2=0.99, momentum=0.5, dampening=0.2, nesterov=True, weight_decay=0.01, frequency=3, start=4,
                          grafting=AdamPreconditionerConfig(beta2=0.99, epsilon=1e-3), steps=9)
        weight = torch.nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
        initial = weight.detach().clone()
        grads = [grad.double() for grad in random_grads((6, 4), steps=setting.steps, seed=6)]
        optimizer = setting.optimizer([weight], max_preconditioner_dim=6, preconditioner_dtype=torch.float64)
        run(optimizer, [weight], [[grad] for grad in grads])
        self.assertEqual(optimizer.state[weight]["block_0"]["shampoo"]["factor_matrices"][0].dtype, torch.float64)
        torch.testing.assert_close(weight.detach(), reference_trajectory(setting, initial, grads), rtol=1e-12, atol=1e-12)

    def test_reference_grafting_names_with_the_reference_defaults(self) -> None:
        self.assertEqual([AdaGradGraftingConfig().epsilon, RMSpropGraftingConfig().epsilon, AdamGraftingConfig().epsilon], [1e-10] * 3)
        self.assertEqual([RMSpropGraftingConfig().beta2, AdamGraftingConfig().beta2], [0.99, 0.999])
        self.assertIsInstance(SGDGraftingConfig(), SGDPreconditionerConfig)
        weights = []
        for grafting in (AdamPreconditionerConfig(beta2=0.9, epsilon=1e-3), AdamGraftingConfig(beta2=0.9, epsilon=1e-3)):
            weight = torch.nn.Parameter(torch.ones(6, 4))
            run(Setting(grafting=grafting, beta1=0.9).optimizer([weight]), [weight], [[grad] for grad in random_grads((6, 4), steps=3, seed=2)])
            weights.append(weight.detach())
        self.assertTrue(torch.equal(weights[0], weights[1]))

    def test_decoupled_and_l2_weight_decay_differ(self) -> None:
        weights = []
        for decoupled in (True, False):
            weight = torch.nn.Parameter(torch.ones(3, 3))
            run(Setting(weight_decay=0.5, decoupled=decoupled).optimizer([weight]), [weight], [[torch.eye(3)]] * 2)
            weights.append(weight.detach())
        self.assertGreater(float((weights[0] - weights[1]).abs().max()), 1e-3)


class ParameterShapesTest(unittest.TestCase):
    def test_zero_dim_one_dim_and_conv_parameters(self) -> None:
        scalar = torch.nn.Parameter(torch.tensor(2.0))
        bias = torch.nn.Parameter(torch.zeros(7))
        conv = torch.nn.Parameter(torch.zeros(4, 3, 3, 3))
        optimizer = DistributedShampoo([scalar, bias, conv], lr=1.0, betas=(0.0, 1.0), epsilon=1e-2, max_preconditioner_dim=32)
        grads: list[torch.Tensor | None] = [torch.tensor(0.5), torch.arange(7.0), torch.ones(4, 3, 3, 3)]
        run(optimizer, [scalar, bias, conv], [grads])
        factor_shapes = {
            name: [tuple(f.shape) for f in optimizer.state[param]["block_0"]["shampoo"]["factor_matrices"].values()]
            for name, param in (("scalar", scalar), ("bias", bias), ("conv", conv))
        }
        # A 0-dim parameter is one block of shape (1,); the conv weight merges (3, 3, 3) into 27.
        self.assertEqual(factor_shapes, {"scalar": [(1, 1)], "bias": [(7, 7)], "conv": [(4, 4), (27, 27)]})
        self.assertAlmostEqual(float(scalar.detach()), 2.0 - 0.5 / math.sqrt(0.25 + 1e-2), places=5)
        g = torch.arange(7.0, dtype=torch.float64)
        expected_bias = -(explicit_root(torch.outer(g, g), 2, 1e-2) @ g)
        # The root is computed in float32 from a matrix of condition number ~9e3 (91 / 1e-2): float32
        # rounding, amplified, not 1e-5, is the tolerance (the CPU's kernels decide the last digits).
        torch.testing.assert_close(bias.detach().double(), expected_bias, rtol=2e-4, atol=2e-5)
        g = torch.ones(4, 27, dtype=torch.float64)
        expected_conv = -(explicit_root(g @ g.T, 4, 1e-2) @ g @ explicit_root(g.T @ g, 4, 1e-2))
        torch.testing.assert_close(conv.detach().double(), expected_conv.reshape(4, 3, 3, 3), rtol=1e-5, atol=1e-6)

    def test_parameters_without_gradients_are_left_alone(self) -> None:
        used, unused = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(2, 2))
        optimizer = Setting(momentum=0.9, beta1=0.9).optimizer([used, unused])
        run(optimizer, [used, unused], [[torch.ones(3, 2), None]] * 3)
        self.assertTrue(torch.equal(unused.detach(), torch.ones(2, 2)))
        self.assertTrue(torch.equal(optimizer.state[unused]["block_0"]["momentum"], torch.zeros(4)))
        self.assertFalse(torch.equal(used.detach(), torch.ones(3, 2)))

    def test_one_step_count_per_group_advanced_by_every_step(self) -> None:
        # As in the reference: the group's first parameter holds the step, which counts step()
        # calls, so a parameter's first gradient at step 3 is bias-corrected with t = 3.
        first, late = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
        other = torch.nn.Parameter(torch.zeros(1))
        optimizer = DistributedShampoo(
            [{"params": [first, late]}, {"params": [other]}], lr=1.0, betas=(0.9, 1.0), start_preconditioning_step=10,
        )
        run(optimizer, [first, late, other], [[torch.ones(2), None, None], [torch.ones(2), None, None], [torch.ones(2), torch.ones(3), None]])
        self.assertEqual([int(optimizer.state[p]["step"]) for p in (first, other)], [3, 3])
        self.assertNotIn("step", optimizer.state[late])
        # Before start_preconditioning_step, without grafting, the update is the bias-corrected filtered gradient.
        torch.testing.assert_close(late.detach(), torch.full((3,), -0.1 / (1 - 0.9**3)))
        self.assertTrue(torch.equal(other.detach(), torch.zeros(1)))

    def test_nesterov_scales_the_direction_by_one_minus_dampening(self) -> None:
        # Step 1: B = (1 - d) D, and the reference's Nesterov update is (1 - d) D + m B = (1 - d)(1 + m) D.
        updates = []
        for momentum, nesterov in ((0.0, False), (0.9, True)):
            weight = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
            run(Setting(momentum=momentum, dampening=0.3, nesterov=nesterov).optimizer([weight]), [weight], [[torch.arange(1.0, 4.0, dtype=torch.float64)]])
            updates.append(weight.detach())
        torch.testing.assert_close(updates[1], updates[0] * (0.7 * 1.9), rtol=1e-12, atol=0.0)

    def test_bfloat16_factors_store_the_float32_factors_rounded(self) -> None:
        grads = random_grads((5, 3), steps=4, seed=7)
        results = {}
        for dtype in (torch.float32, torch.bfloat16):
            weight = torch.nn.Parameter(torch.zeros(5, 3))
            optimizer = DistributedShampoo([weight], lr=0.1, betas=(0.0, 1.0), epsilon=1e-2, preconditioner_dtype=dtype)
            weight.grad = grads[0].clone()
            optimizer.step()
            shampoo = optimizer.state[weight]["block_0"]["shampoo"]
            results[dtype] = (shampoo["factor_matrices"][0].clone(), weight.detach().clone())
            self.assertEqual({t.dtype for t in shampoo["inv_factor_matrices"].values()}, {dtype})
            run(optimizer, [weight], [[grad] for grad in grads[1:]])
            self.assertTrue(bool(torch.isfinite(weight).all()))
        self.assertTrue(torch.equal(results[torch.bfloat16][0], results[torch.float32][0].to(torch.bfloat16)))
        torch.testing.assert_close(results[torch.bfloat16][1], results[torch.float32][1], rtol=2e-2, atol=2e-2)

    @parameterized.expand(
        [
            # (shape, max_preconditioner_dim, target_parameter_dimensionality, the blocks' factor sizes)
            ("inf_merges_to_one_vector", (3, 4, 5), math.inf, 1, [[60]]),
            ("inf_keeps_matrices", (6, 1, 10), math.inf, 2, [[6, 10]]),
            ("inf_merges_nothing", (3, 4, 5), math.inf, math.inf, [[3, 4, 5]]),
            ("blocks_of_a_matrix", (3, 4, 20), 12, 2, [[12, 12], [12, 8]]),
        ]
    )
    def test_blocks_follow_max_dim_and_target_dimensionality(
        self, _name: str, shape: tuple[int, ...], max_dim: int | float, target: int | float, factor_sizes: list[list[int]]
    ) -> None:
        weight = torch.nn.Parameter(torch.zeros(shape))
        optimizer = DistributedShampoo(
            [weight], max_preconditioner_dim=max_dim,
            distributed_config=SingleDeviceDistributedConfig(target_parameter_dimensionality=target),
        )
        blocks = [optimizer.state[weight][f"block_{index}"] for index in range(len(factor_sizes))]
        self.assertEqual(len([key for key in optimizer.state[weight] if key.startswith("block_")]), len(factor_sizes))
        self.assertEqual(
            [[factor.shape[0] for factor in block["shampoo"]["factor_matrices"].values()] for block in blocks], factor_sizes
        )
        weight.grad = torch.ones(shape)
        optimizer.step()
        self.assertTrue(torch.isfinite(weight).all())

    def test_whole_matrix_block_with_inf_follows_the_formula(self) -> None:
        # max_preconditioner_dim=math.inf with matrices kept: one (8, 12) block, as one block on its own.
        generator = torch.Generator().manual_seed(5)
        weight = torch.nn.Parameter(torch.randn(8, 12, generator=generator))
        initial = weight.detach().clone()
        grads = random_grads((8, 12), steps=3, seed=6)
        setting = Setting(beta1=0.9, beta2=0.99, epsilon=1e-3)
        optimizer = DistributedShampoo(
            [weight], lr=setting.lr, betas=(setting.beta1, setting.beta2), epsilon=setting.epsilon,
            max_preconditioner_dim=math.inf, start_preconditioning_step=1,
            distributed_config=SingleDeviceDistributedConfig(target_parameter_dimensionality=2),
        )
        run(optimizer, [weight], [[grad] for grad in grads])
        torch.testing.assert_close(weight.detach().double(), reference_trajectory(setting, initial, grads), rtol=1e-4, atol=1e-5)

    def test_compiled_block_step_takes_the_eager_trajectory(self) -> None:
        # The "eager" backend compiles through dynamo and runs the captured graphs as they are.
        from torch._dynamo.testing import CompileCounter

        counter = CompileCounter()
        weights = []
        for compile_config in (None, ShampooPT2CompileConfig(backend=counter)):
            torch._dynamo.reset()
            weight = torch.nn.Parameter(torch.ones(4, 6, dtype=torch.float64))
            optimizer = DistributedShampoo(
                [weight], betas=(0.9, 0.99), momentum=0.5, grafting_config=AdaGradGraftingConfig(), shampoo_pt2_compile_config=compile_config
            )
            run(optimizer, [weight], [[grad.double()] for grad in random_grads((4, 6), steps=4, seed=8)])
            weights.append(weight.detach().clone())
        self.assertGreater(counter.frame_count, 0)
        torch.testing.assert_close(weights[1], weights[0], rtol=1e-12, atol=0.0)

    def test_use_pin_memory_is_kept_in_the_parameter_groups(self) -> None:
        weight = torch.nn.Parameter(torch.ones(2))
        optimizer = DistributedShampoo([weight], use_pin_memory=True)
        self.assertIs(optimizer.param_groups[0]["use_pin_memory"], True)
        groups = optimizer.distributed_state_dict([("w", weight)])["param_groups"]
        self.assertIs(groups["w"]["use_pin_memory"], True)  # pyre-ignore[16]

    def test_groups_hold_beta3_and_start_preconditioning_step_resolved_as_the_reference(self) -> None:
        # The reference's state dict carries them so, and the reference steps with what it loads.
        defaulted = DistributedShampoo([torch.nn.Parameter(torch.ones(2))], betas=(0.8, 0.9), precondition_frequency=3)
        self.assertEqual((defaulted.param_groups[0]["beta3"], defaulted.param_groups[0]["start_preconditioning_step"]), (0.8, 3))
        given = DistributedShampoo(
            [torch.nn.Parameter(torch.ones(2))], betas=(0.8, 0.9), beta3=0.5, precondition_frequency=3, start_preconditioning_step=7
        )
        self.assertEqual((given.param_groups[0]["beta3"], given.param_groups[0]["start_preconditioning_step"]), (0.5, 7))

    def test_closure_loss_is_returned(self) -> None:
        weight: torch.nn.Parameter = torch.nn.Parameter(torch.ones(2, 2))
        optimizer: DistributedShampoo = DistributedShampoo([weight])

        def closure() -> float:
            optimizer.zero_grad()
            loss = weight.pow(2).sum()
            loss.backward()
            return float(loss.detach())

        self.assertEqual(optimizer.step(closure), 4.0)
        self.assertLess(float(weight.detach().pow(2).sum()), 4.0)


class ValidationTest(unittest.TestCase):
    @parameterized.expand(
        [
            ({"lr": -1.0}, "Invalid lr: -1.0. Must be >= 0."),
            ({"betas": (1.0, 1.0)}, "Invalid betas[0]: 1.0. Must be in [0, 1)."),
            ({"betas": (0.9, 0.0)}, "Invalid betas[1]: 0.0. Must be in (0, 1]."),
            ({"betas": (0.9,)}, "Invalid betas: (0.9,). Must be a pair (beta1, beta2)."),
            ({"beta3": 1.0}, "Invalid beta3: 1.0. Must be -1 or in [0, 1)."),
            ({"epsilon": 0.0}, "Invalid epsilon: 0.0. Must be > 0."),
            ({"epsilon": 1e-12, "preconditioner_config": EigendecomposedShampooPreconditionerConfig(
                amortized_computation_config=EighEigendecompositionConfig(rank_deficient_stability_config=PseudoInverseConfig()))},
             "Invalid epsilon: 1e-12. Must be == 0.0 when PseudoInverseConfig is used."),
            ({"momentum": 1.0}, "Invalid momentum: 1.0. Must be in [0, 1)."),
            ({"dampening": -0.1}, "Invalid dampening: -0.1. Must be in [0, 1)."),
            ({"weight_decay": -0.1}, "Invalid weight_decay: -0.1. Must be >= 0."),
            ({"max_preconditioner_dim": 0}, "Invalid max_preconditioner_dim: 0. Must be >= 1."),
            ({"max_preconditioner_dim": 2.5}, "Invalid max_preconditioner_dim: 2.5. Must be an integer or math.inf."),
            ({"max_preconditioner_dim": -math.inf}, "Invalid max_preconditioner_dim: -inf. Must be an integer or math.inf."),
            ({"use_pin_memory": None}, "Invalid use_pin_memory: None. Must be a bool."),
            ({"precondition_frequency": 0}, "Invalid precondition_frequency: 0. Must be >= 1."),
            ({"precondition_frequency": 4, "start_preconditioning_step": 2},
             "Invalid start_preconditioning_step: 2. Must be -1 or >= precondition_frequency (4)."),
            ({"use_bias_correction": 1}, "Invalid use_bias_correction: 1. Must be a bool."),
            ({"preconditioner_dtype": torch.int64},
             "Invalid preconditioner_dtype: torch.int64. Must be one of (torch.bfloat16, torch.float16, torch.float32, torch.float64)."),
        ]
    )
    def test_invalid_hyperparameter_is_named(self, kwargs: dict[str, object], message: str) -> None:
        with self.assertRaises(ValueError) as raised:
            DistributedShampoo([torch.nn.Parameter(torch.ones(2))], **kwargs)  # pyre-ignore[6]: deliberately bad values
        self.assertEqual(str(raised.exception), message)

    @parameterized.expand(
        [
            (lambda: AdaGradPreconditionerConfig(epsilon=0.0), "AdaGradPreconditionerConfig: epsilon must be > 0, got 0.0"),
            (lambda: RMSpropPreconditionerConfig(beta2=1.5), "RMSpropPreconditionerConfig: beta2 must be in (0, 1], got 1.5"),
            (lambda: AdamPreconditionerConfig(epsilon=-1.0), "AdamPreconditionerConfig: epsilon must be > 0, got -1.0"),
            (lambda: DDPDistributedConfig(num_trainers_per_group=0), "DDPDistributedConfig: num_trainers_per_group must be -1 or >= 1, got 0"),
            (lambda: SingleDeviceDistributedConfig(target_parameter_dimensionality=2.5),
             "Invalid SingleDeviceDistributedConfig.target_parameter_dimensionality: 2.5. Must be an integer or math.inf."),
            (lambda: FullyShardDistributedConfig(target_parameter_dimensionality=0),
             "Invalid FullyShardDistributedConfig.target_parameter_dimensionality: 0. Must be >= 1."),
            (lambda: DDPDistributedConfig(communication_dtype=torch.int8),
             "DDPDistributedConfig: communication_dtype must be one of (torch.float32, torch.bfloat16, torch.float16), got torch.int8"),
        ]
    )
    def test_invalid_config_is_named(self, make: object, message: str) -> None:
        assert callable(make)
        with self.assertRaises(ValueError) as raised:
            make()
        self.assertEqual(str(raised.exception), message)

    def test_invalid_value_set_in_a_group_fails_the_next_step_before_anything_changes(self) -> None:
        first, second = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
        optimizer = DistributedShampoo([{"params": [first]}, {"params": [second]}])
        optimizer.param_groups[1]["lr"] = float("nan")
        first.grad, second.grad = torch.ones(2), torch.ones(2)
        with self.assertRaisesRegex(ValueError, r"^Invalid lr: nan\. Must be >= 0\.$"):
            optimizer.step()
        self.assertTrue(torch.equal(first.detach(), torch.ones(2)))
        self.assertEqual(int(optimizer.state[first]["step"]), 0)
        self.assertTrue(torch.equal(optimizer.state[first]["block_0"]["shampoo"]["factor_matrices"][0], torch.zeros(2, 2)))

    def test_momentum_turned_on_after_construction_is_refused(self) -> None:
        weight = torch.nn.Parameter(torch.ones(2))
        optimizer = DistributedShampoo([weight])
        optimizer.param_groups[0]["momentum"] = 0.9
        weight.grad = torch.ones(2)
        with self.assertRaisesRegex(RuntimeError, "momentum was zero at construction"):
            optimizer.step()

    def test_distributed_config_without_a_process_group(self) -> None:
        with self.assertRaisesRegex(RuntimeError, "^DDPDistributedConfig needs torch.distributed to be initialised first$"):
            DistributedShampoo([torch.nn.Parameter(torch.ones(2))], distributed_config=DDPDistributedConfig())

    def test_fully_shard_config_needs_dtensor_parameters(self) -> None:
        with self.assertRaisesRegex(ValueError, r"^FullyShardDistributedConfig: parameter #0 is a Parameter, not a DTensor; apply"):
            DistributedShampoo([torch.nn.Parameter(torch.ones(2))], distributed_config=FullyShardDistributedConfig())

    def test_nesterov_without_momentum_warns_and_runs_without_momentum(self) -> None:
        weights = []
        for nesterov in (False, True):
            weight = torch.nn.Parameter(torch.ones(3))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                optimizer = DistributedShampoo([weight], use_nesterov=nesterov)
            self.assertEqual([str(w.message) for w in caught], ["DistributedShampoo: use_nesterov is set but momentum is 0; continuing without momentum or Nesterov"] if nesterov else [])
            run(optimizer, [weight], [[torch.arange(3.0)]] * 2)
            weights.append(weight.detach())
        self.assertTrue(torch.equal(weights[0], weights[1]))

    def test_each_group_steps_with_its_own_configs(self) -> None:
        # As in the reference: one optimizer over two groups with their own grafting and
        # preconditioner configs follows the two single-group optimizers bit for bit.
        soap = EigenvalueCorrectedShampooPreconditionerConfig(amortized_computation_config=QREigendecompositionConfig())
        pseudo_inverse = EigendecomposedShampooPreconditionerConfig(
            amortized_computation_config=EighEigendecompositionConfig(rank_deficient_stability_config=PseudoInverseConfig(rank_rtol=None))
        )
        group_options: list[dict[str, object]] = [
            {"grafting_config": SGDPreconditionerConfig(), "preconditioner_config": soap},
            {"preconditioner_config": pseudo_inverse, "epsilon": 0.0},  # epsilon 0 in this group only
            {},
        ]
        shapes = [(4, 6), (5, 3), (7,)]
        initial = [torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed, shape in enumerate(shapes)]
        grads = [[torch.randn(shape, generator=torch.Generator().manual_seed(10 + step)) for shape in shapes] for step in range(4)]
        constructor: dict[str, object] = {"betas": (0.9, 0.95), "momentum": 0.5, "grafting_config": AdamPreconditionerConfig()}
        together = [torch.nn.Parameter(value.clone()) for value in initial]
        optimizer = DistributedShampoo([{"params": [param], **options} for param, options in zip(together, group_options)], **constructor)  # pyre-ignore[6]
        run(optimizer, together, grads)
        for index, options in enumerate(group_options):
            alone = torch.nn.Parameter(initial[index].clone())
            run(DistributedShampoo([alone], **{**constructor, **options}), [alone], [[step[index]] for step in grads])  # pyre-ignore[6]
            self.assertTrue(torch.equal(together[index], alone), index)
        self.assertIs(optimizer.param_groups[0]["preconditioner_config"], soap)
        self.assertEqual(optimizer.param_groups[2]["preconditioner_config"], DefaultShampooConfig)
        self.assertEqual(optimizer.param_groups[2]["grafting_config"], AdamPreconditionerConfig())
        groups = optimizer.distributed_state_dict([(f"p{index}", param) for index, param in enumerate(together)])["param_groups"]
        self.assertEqual([group["grafting_config"] for group in groups.values()], [SGDPreconditionerConfig(), AdamPreconditionerConfig(), AdamPreconditionerConfig()])  # pyre-ignore[16]
        self.assertEqual(groups["p1"]["preconditioner_config"], pseudo_inverse)  # pyre-ignore[16]

    def test_a_group_with_another_distribution_is_refused(self) -> None:
        groups = [{"params": [torch.nn.Parameter(torch.ones(2))]}, {"params": [torch.nn.Parameter(torch.ones(2))], "distributed_config": DDPDistributedConfig()}]
        with self.assertRaisesRegex(ValueError, r"parameter group 1 sets distributed_config=DDPDistributedConfig\(.*\); every group is distributed by the constructor's"):
            DistributedShampoo(groups)

    def test_empty_parameter_group(self) -> None:
        with self.assertRaisesRegex(ValueError, r"^DistributedShampoo: a parameter group has no parameters"):
            DistributedShampoo([{"params": [torch.nn.Parameter(torch.ones(2))]}, {"params": []}])

    def test_param_groups_cannot_be_added_later(self) -> None:
        optimizer = DistributedShampoo([torch.nn.Parameter(torch.ones(2))])
        with self.assertRaisesRegex(RuntimeError, "cannot be added after construction"):
            optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})

    def test_non_contiguous_parameter(self) -> None:
        with self.assertRaisesRegex(ValueError, r"^DistributedShampoo: parameter #0 is not contiguous$"):
            DistributedShampoo([torch.nn.Parameter(torch.ones(3, 2).T)])


def _model_and_grads(seed: int) -> tuple[torch.nn.Sequential, list[list[torch.Tensor]]]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2))
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(6)]
    return model, grads


SETTING = Setting(beta1=0.9, beta2=0.99, momentum=0.5, weight_decay=0.01, grafting=AdamPreconditionerConfig(beta2=0.99, epsilon=1e-8))


class StateDictTest(unittest.TestCase):
    def _optimizer(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> DistributedShampoo:
        setting = SETTING
        return DistributedShampoo(
            model.parameters(), lr=setting.lr, betas=(setting.beta1, setting.beta2), momentum=setting.momentum,
            weight_decay=setting.weight_decay, grafting_config=setting.grafting, max_preconditioner_dim=4,
            preconditioner_dtype=dtype,
        )

    def _fresh(self) -> tuple[torch.nn.Sequential, DistributedShampoo, dict[str, object]]:
        """A model, its optimizer, and the optimizer's distributed state dict."""
        model, _ = _model_and_grads(0)
        optimizer = self._optimizer(model)
        return model, optimizer, optimizer.distributed_state_dict(model.named_parameters())

    def test_distributed_state_dict_layout(self) -> None:
        model, optimizer, state_dict = self._fresh()
        state = state_dict["state"]
        assert isinstance(state, dict)
        self.assertEqual(list(state), ["0.weight", "0.bias", "2.weight", "2.bias"])
        # The reference's layout: each parameter's state flattened to JSON-list keys. 0.weight is
        # (9, 6) cut at 4: 3 x 2 blocks; the group's step is in its first parameter's state.
        self.assertEqual(list(state["0.weight"])[0], '["step"]')
        self.assertEqual({decode_key(key)[0] for key in state["0.weight"]}, {"step"} | {f"block_{i}" for i in range(6)})
        block_5 = {tuple(decode_key(key)[1:]): value for key, value in state["0.weight"].items() if key.startswith('["block_5"')}
        self.assertEqual(
            {path: tuple(value.shape) for path, value in block_5.items()},
            {
                ("shampoo", "factor_matrices", 0): (1, 1), ("shampoo", "factor_matrices", 1): (2, 2),
                ("shampoo", "inv_factor_matrices", 0): (1, 1), ("shampoo", "inv_factor_matrices", 1): (2, 2),
                ("adagrad",): (1, 2), ("filtered_grad",): (1, 2), ("momentum",): (1, 2),
            },
        )
        self.assertIs(block_5[("momentum",)], optimizer.state[next(model.parameters())]["block_5"]["momentum"])
        self.assertNotIn('["step"]', state["0.bias"])
        groups = state_dict["param_groups"]
        assert isinstance(groups, dict)
        # One entry per group, keyed by its parameters' names sorted and joined by "/", holding
        # the reference's group keys: the hyperparameters and the configs.
        self.assertEqual(list(groups), ["0.bias/0.weight/2.bias/2.weight"])
        group = groups["0.bias/0.weight/2.bias/2.weight"]
        self.assertEqual(group["betas"], (0.9, 0.99))
        self.assertEqual(sorted(group), sorted([
            "lr", "betas", "beta3", "epsilon", "momentum", "dampening", "weight_decay", "max_preconditioner_dim",
            "precondition_frequency", "start_preconditioning_step", "use_nesterov", "use_bias_correction",
            "use_decoupled_weight_decay", "use_pin_memory", "grafting_config", "distributed_config", "preconditioner_config",
        ]))
        self.assertEqual(group["grafting_config"], SETTING.grafting)
        self.assertIs(group["distributed_config"], DefaultSingleDeviceDistributedConfig)
        self.assertEqual(group["preconditioner_config"], RootInvShampooPreconditionerConfig(inv_factor_matrix_dtype=torch.float32))  # preconditioner_dtype
        self.assertNotIn("param_groups", optimizer.distributed_state_dict(model.named_parameters(), save_param_groups=False))

    def test_nested_layout_is_the_earlier_versions(self) -> None:
        model, optimizer, state_dict = self._fresh()
        nested = optimizer.distributed_state_dict(model.named_parameters(), layout="nested")
        state = nested["state"]
        assert isinstance(state, dict)
        self.assertEqual(list(state["0.weight"]), ["step"] + [f"block_{i}" for i in range(6)])
        self.assertEqual({name: unflatten(flat) for name, flat in state_dict["state"].items()}, state)  # pyre-ignore[16]
        groups = nested["param_groups"]
        assert isinstance(groups, dict)
        self.assertEqual(list(groups), ["0.weight", "0.bias", "2.weight", "2.bias"])
        self.assertEqual(sorted(groups["2.bias"]), sorted(HYPERPARAMETERS))
        with self.assertRaisesRegex(ValueError, "layout must be 'reference' or 'nested', got 'flat'"):
            optimizer.distributed_state_dict(model.named_parameters(), layout="flat")  # pyre-ignore[6]

    def _resume(self, save: str, dtype: torch.dtype = torch.float32) -> None:
        model, grads = _model_and_grads(1)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = self._optimizer(model, dtype)
        params = list(model.parameters())
        run(optimizer, params, grads)
        uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

        model.load_state_dict(initial)
        optimizer = self._optimizer(model, dtype)
        run(optimizer, params, grads[:3])
        saved = (
            optimizer.state_dict()
            if save == "torch"
            else optimizer.distributed_state_dict(model.named_parameters())
        )
        saved = _clone(saved)
        if save == "nested":  # the layout of earlier versions
            saved = _clone(optimizer.distributed_state_dict(model.named_parameters(), layout="nested"))
        halfway = {k: v.clone() for k, v in model.state_dict().items()}

        resumed_model, _ = _model_and_grads(2)
        resumed_model.load_state_dict(halfway)
        resumed = self._optimizer(resumed_model, dtype)
        resumed.param_groups[0]["lr"] = 123.0
        if save == "torch":
            resumed.load_state_dict(saved)
        else:
            resumed.load_distributed_state_dict(saved, resumed_model.named_parameters())
        self.assertEqual(resumed.param_groups[0]["lr"], SETTING.lr)
        run(resumed, list(resumed_model.parameters()), grads[3:])
        for key, value in resumed_model.state_dict().items():
            self.assertTrue(torch.equal(value, uninterrupted[key]), key)
        factor = resumed.state[next(resumed_model.parameters())]["block_0"]["shampoo"]["factor_matrices"][0]
        self.assertEqual(factor.dtype, dtype)

    @parameterized.expand(
        [("torch", torch.float32), ("torch", torch.bfloat16), ("distributed", torch.float32), ("distributed", torch.bfloat16), ("nested", torch.float32)]
    )
    def test_resume_from_a_state_dict_continues_the_same_trajectory(self, save: str, dtype: torch.dtype) -> None:
        self._resume(save, dtype)

    def test_missing_parameter_state(self) -> None:
        model, optimizer, state_dict = self._fresh()
        state = state_dict["state"]
        assert isinstance(state, dict)
        del state["2.bias"]
        with self.assertRaisesRegex(KeyError, "no state for parameter '2.bias'"):
            optimizer.load_distributed_state_dict(state_dict, model.named_parameters())
        optimizer.load_distributed_state_dict(state_dict, model.named_parameters(), enable_missing_key_check=False)

    def test_missing_block_state(self) -> None:
        model, optimizer, state_dict = self._fresh()
        del _node(state_dict, "state", "0.weight")['["block_3", "momentum"]']
        with self.assertRaisesRegex(KeyError, r'Key momentum not found in state dict to load. \(at \["block_3", "momentum"\]\)'):
            optimizer.load_distributed_state_dict(state_dict, model.named_parameters())

    def test_shape_mismatch(self) -> None:
        model, optimizer, state_dict = self._fresh()
        _node(state_dict, "state", "0.bias")['["block_0", "momentum"]'] = torch.zeros(5)
        with self.assertRaisesRegex(ValueError, r'\["block_0", "momentum"\] expects a tensor of shape \(4,\), got \(5,\)'):
            optimizer.load_distributed_state_dict(state_dict, model.named_parameters())

    def test_changed_max_preconditioner_dim_is_refused_before_anything_changes(self) -> None:
        model, optimizer, state_dict = self._fresh()
        state_dict = _clone(state_dict)
        _node(state_dict, "param_groups", "0.bias/0.weight/2.bias/2.weight").update(max_preconditioner_dim=8, lr=5.0)
        with self.assertRaisesRegex(ValueError, "max_preconditioner_dim 8 of '0.bias/0.weight/2.bias/2.weight' differs from the optimizer's 4"):
            optimizer.load_distributed_state_dict(state_dict, model.named_parameters())
        self.assertEqual(optimizer.param_groups[0]["lr"], SETTING.lr)

    def test_unnamed_parameter(self) -> None:
        model, optimizer, _ = self._fresh()
        with self.assertRaisesRegex(ValueError, r"key_to_param names none of the optimizer's parameters #\[2, 3\]"):
            optimizer.distributed_state_dict(list(model.named_parameters())[:2])


def _node(state_dict: dict[str, object], *keys: str) -> dict[str, object]:
    """The nested dict at ``keys``."""
    node: object = state_dict
    for key in keys:
        assert isinstance(node, dict)
        node = node[key]
    assert isinstance(node, dict)
    return node


def _clone(value: object) -> dict[str, object]:
    def copy(node: object) -> object:
        if isinstance(node, dict):
            return {key: copy(item) for key, item in node.items()}
        if isinstance(node, list):
            return [copy(item) for item in node]
        return node.clone() if isinstance(node, torch.Tensor) else node

    copied = copy(value)
    assert isinstance(copied, dict)
    return copied
