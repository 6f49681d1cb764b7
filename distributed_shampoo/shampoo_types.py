# pyre-strict
"""Frozen configuration dataclasses of ``DistributedShampoo`` and the names of its state keys."""

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.distributed.device_mesh import DeviceMesh

from distributed_shampoo.preconditioner.matrix_functions_types import (
    CoupledHigherOrderConfig,
    CoupledNewtonConfig,
    DefaultEigenConfig,
    DefaultEigendecompositionConfig,
    DefaultNewtonSchulzOrthogonalizationConfig,
    EigenConfig,
    EigendecompositionConfig,
    EighEigendecompositionConfig,
    MatrixFunctionConfig,
    NewtonSchulzOrthogonalizationConfig,
    OrthogonalizationConfig,
    PerturbationConfig,
    PseudoInverseConfig,
    QREigendecompositionConfig,
    RankDeficientStabilityConfig,
    RootInvConfig,
    SVDOrthogonalizationConfig,
)

# A parameter's step count in ``state_dict()`` and ``distributed_state_dict()``; the keys of a
# block's state are ``BlockState``'s attribute names.
STEP = "step"

# The dtypes the all-gather of updates may use.
COMMUNICATION_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


def block_key(block_index: int) -> str:
    """The state key of a parameter's block, e.g. ``block_3``."""
    return f"block_{block_index}"


def _check_epsilon(config: object, epsilon: float) -> None:
    if not epsilon > 0.0:
        raise ValueError(f"{type(config).__name__}: epsilon must be > 0, got {epsilon}")


def _check_beta2(config: object, beta2: float) -> None:
    if not 0.0 < beta2 <= 1.0:
        raise ValueError(f"{type(config).__name__}: beta2 must be in (0, 1], got {beta2}")


@dataclass(frozen=True)
class GraftingConfig:
    """Base class of the grafting configurations: the per-block step size Shampoo borrows."""


@dataclass(frozen=True)
class SGDPreconditionerConfig(GraftingConfig):
    """Grafting onto SGD: each block's Shampoo direction gets the filtered gradient's norm."""


@dataclass(frozen=True)
class AdaGradPreconditionerConfig(GraftingConfig):
    """Grafting onto AdaGrad: ``g / (sqrt(sum of g^2) + epsilon)``.

    Raises:
        ValueError: If ``epsilon <= 0``.
    """

    epsilon: float = 1e-10

    def __post_init__(self) -> None:
        _check_epsilon(self, self.epsilon)


@dataclass(frozen=True)
class _SquaredGradientEMAConfig(GraftingConfig):
    """Grafting onto an exponential moving average ``v`` of ``g^2`` (RMSprop, Adam).

    Raises:
        ValueError: If ``beta2`` is outside (0, 1] or ``epsilon <= 0``.
    """

    beta2: float = 0.99
    epsilon: float = 1e-8

    def __post_init__(self) -> None:
        _check_beta2(self, self.beta2)
        _check_epsilon(self, self.epsilon)


@dataclass(frozen=True)
class RMSpropPreconditionerConfig(_SquaredGradientEMAConfig):
    """Grafting onto RMSprop: ``g / (sqrt(v) + epsilon)`` with ``v`` an EMA of ``g^2``."""


@dataclass(frozen=True)
class AdamPreconditionerConfig(_SquaredGradientEMAConfig):
    """Grafting onto Adam: RMSprop with ``v`` bias-corrected by ``1 - beta2^t``."""

    beta2: float = 0.999


@dataclass(frozen=True)
class SGDGraftingConfig(SGDPreconditionerConfig):
    """The reference implementation's name for ``SGDPreconditionerConfig``."""


@dataclass(frozen=True)
class AdaGradGraftingConfig(AdaGradPreconditionerConfig):
    """The reference implementation's name for ``AdaGradPreconditionerConfig`` (epsilon 1e-10)."""


@dataclass(frozen=True)
class RMSpropGraftingConfig(RMSpropPreconditionerConfig):
    """The reference implementation's RMSprop grafting: ``RMSpropPreconditionerConfig`` with its
    default ``epsilon``, 1e-10 (this package's default is 1e-8)."""

    epsilon: float = 1e-10


@dataclass(frozen=True)
class AdamGraftingConfig(AdamPreconditionerConfig):
    """The reference implementation's Adam grafting: ``AdamPreconditionerConfig`` with its
    default ``epsilon``, 1e-10 (this package's default is 1e-8)."""

    epsilon: float = 1e-10


def _check_int_or_inf(name: str, value: object) -> None:
    """``value`` must be an int >= 1 or ``math.inf`` (the reference's rule for dimensions)."""
    if isinstance(value, bool) or not (isinstance(value, int) or value == math.inf):
        raise ValueError(f"Invalid {name}: {value!r}. Must be an integer or math.inf.")
    if not value >= 1:  # pyre-ignore[58]: an int or inf here
        raise ValueError(f"Invalid {name}: {value!r}. Must be >= 1.")


@dataclass(frozen=True)
class DistributedConfig:
    """Base class of the distributed configurations (the reference's).

    Attributes:
        target_parameter_dimensionality: How many dimensions a parameter keeps when its small
            dimensions are merged before blocking (``merge_small_dims``; size-1 dimensions always
            go): 1 merges as far as ``max_preconditioner_dim`` allows, 2 keeps matrices (e.g. for
            spectral descent), ``math.inf`` merges nothing. Keyword only.

    Raises:
        ValueError: ``target_parameter_dimensionality`` is neither an int >= 1 nor ``math.inf``.
    """

    target_parameter_dimensionality: int | float = field(default=1, kw_only=True)

    def __post_init__(self) -> None:
        _check_int_or_inf(f"{type(self).__name__}.target_parameter_dimensionality", self.target_parameter_dimensionality)


@dataclass(frozen=True)
class SingleDeviceDistributedConfig(DistributedConfig):
    """Shampoo in one process: every block on this rank (the default)."""


# The constructor's default, as in the reference.
DefaultSingleDeviceDistributedConfig = SingleDeviceDistributedConfig()


@dataclass(frozen=True)
class DDPDistributedConfig(DistributedConfig):
    """Distributes Shampoo blocks over the ranks of the default process group.

    Attributes:
        num_trainers_per_group: Ranks that share one copy of the optimizer state; ``-1`` means all
            of them. With ``k`` < world size, the world is cut into groups of ``k`` consecutive
            ranks, each group holds the whole state, and updates are all-gathered within a group.
        communication_dtype: The dtype of the all-gathered updates (float32, bfloat16 or
            float16). A lower precision halves the traffic and rounds every update to it.
        communicate_params: As in the reference: the owners apply their blocks' updates and
            all-gather the updated parameter blocks (every rank, the owner too, takes them as
            gathered, so in ``communication_dtype``), instead of all-gathering the updates.

    Raises:
        ValueError: If ``num_trainers_per_group`` is neither -1 nor >= 1, or the dtype is not one
            of ``COMMUNICATION_DTYPES``.
    """

    num_trainers_per_group: int = -1
    communication_dtype: torch.dtype = torch.float32
    communicate_params: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_trainers_per_group != -1 and self.num_trainers_per_group < 1:
            raise ValueError(
                f"DDPDistributedConfig: num_trainers_per_group must be -1 or >= 1, got {self.num_trainers_per_group}"
            )
        if self.communication_dtype not in COMMUNICATION_DTYPES:
            raise ValueError(
                f"DDPDistributedConfig: communication_dtype must be one of {COMMUNICATION_DTYPES}, "
                f"got {self.communication_dtype}"
            )


@enum.unique
class FSDPParamAssignmentStrategy(enum.Enum):
    """The reference's assignment of an FSDP2 model's parameters to ranks: ``DEFAULT`` (blocks of
    each rank's shard), ``REPLICATE`` (the whole parameters' blocks, as in one process) and
    ``ROUND_ROBIN`` (whole parameters dealt out to the ranks). This package cuts blocks from the
    global shapes and balances their state over the ranks whatever the strategy: the results of
    ``REPLICATE`` with the memory balance ``ROUND_ROBIN`` aims at."""

    DEFAULT = enum.auto()
    REPLICATE = enum.auto()
    ROUND_ROBIN = enum.auto()


@dataclass(frozen=True)
class FullyShardDistributedConfig(DistributedConfig):
    """Distributes Shampoo blocks over the ranks of an FSDP2 (``fully_shard``) model.

    The parameters must be ``fully_shard``'s DTensors: ``Shard(0)`` on one 1-D device mesh,
    shards of any sizes (empty ones included). Unlike the reference implementation, which cuts
    blocks from each rank's local shard, the blocks are those of the global shapes, exactly as in
    one process; each is owned by one rank of the mesh, which receives the block's gradient from
    the ranks holding its rows and sends its update back to them. So the optimizer's state, and
    its trajectory, do not depend on the number of ranks, and its checkpoints load under FSDP2,
    DDP or one process at any world size. Gradients and updates travel in the parameters'
    compute dtype (float32, or float64 for float64 parameters), so nothing is rounded.

    Attributes:
        param_assignment_strategy: The reference's option, accepted and kept; every strategy
            distributes as above (see ``FSDPParamAssignmentStrategy``).
    """

    param_assignment_strategy: FSDPParamAssignmentStrategy = field(default=FSDPParamAssignmentStrategy.DEFAULT, kw_only=True)



@dataclass(frozen=True)
class HybridShardDistributedConfig(FullyShardDistributedConfig):
    """Distributes Shampoo blocks over an FSDP2 model sharded hybridly (HSDP: ``fully_shard`` on a
    2-D mesh, the parameters ``(Replicate(), Shard(0))``).

    Within each replica (one row of the mesh) the blocks are distributed as under
    ``FullyShardDistributedConfig``; the replicas, whose gradients FSDP2 all-reduces, compute
    the same steps, so every replica holds the whole optimizer state. (The reference instead
    spreads each block's work over the replicas as well, by the DDP fields below.)

    Attributes:
        device_mesh: The 2-D mesh, or None for the parameters' own. A live object, not saved in a
            checkpoint's typed JSON (it reads back as None).
        communication_dtype: The reference's DDP field across replicas; accepted and kept, no
            effect here.
        num_trainers_per_group: Likewise.
        communicate_params: Likewise.
    """

    device_mesh: DeviceMesh | None = field(default=None, kw_only=True, compare=False, metadata={"saved": False})
    communication_dtype: torch.dtype = field(default=torch.float32, kw_only=True)
    num_trainers_per_group: int = field(default=-1, kw_only=True)
    communicate_params: bool = field(default=False, kw_only=True)

# The dtypes factor matrices and their inverse roots may be stored in.
PRECONDITIONER_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


class PreconditionerValueError(ValueError):
    """A factor or its inverse root holds NaN or infinity (the reference's error)."""


@dataclass(frozen=True, kw_only=True)
class PreconditionerConfig:
    """Base class of the preconditioner configurations."""


@dataclass(frozen=True, kw_only=True)
class AmortizedPreconditionerConfig(PreconditionerConfig):
    """A preconditioner whose expensive part (a matrix function of each factor) is recomputed every
    ``precondition_frequency`` steps.

    Attributes:
        amortized_computation_config: The matrix function.
        num_tolerated_failed_amortized_computations: How many computations of a block in a row
            may fail (the block keeps its last good result) before the step raises ``ValueError``.
        factor_matrix_dtype: The storage dtype of the factor matrices.

    Raises:
        ValueError: A negative tolerance, or a dtype outside ``PRECONDITIONER_DTYPES``.
    """

    amortized_computation_config: MatrixFunctionConfig
    num_tolerated_failed_amortized_computations: int = 3
    factor_matrix_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.num_tolerated_failed_amortized_computations < 0:
            raise ValueError(
                f"Invalid num_tolerated_failed_amortized_computations value: "
                f"{self.num_tolerated_failed_amortized_computations}. Must be >= 0."
            )
        if self.factor_matrix_dtype not in PRECONDITIONER_DTYPES:
            raise ValueError(f"Invalid factor_matrix_dtype: {self.factor_matrix_dtype}. Must be one of {PRECONDITIONER_DTYPES}.")


@dataclass(frozen=True, kw_only=True)
class ShampooPreconditionerConfig(AmortizedPreconditionerConfig):
    """Kronecker-factored Shampoo.

    Attributes:
        inverse_exponent_override: Per block order ``o``, the inverse root's exponent of every
            dimension (a float) or of some (``{dimension: exponent}``); the others use
            ``1 / (2 o)``. An exponent of 0 leaves that dimension unpreconditioned: it has no
            factor matrix. E.g. ``{2: 0.2, 3: {0: 0.0, 1: 0.25}}``.

    Raises:
        ValueError: A negative order or exponent, or a dimension outside ``[0, o - 1]``.
    """

    # Not hashed (a dict is not hashable); compared.
    inverse_exponent_override: Mapping[int, Mapping[int, float] | float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        override = self.inverse_exponent_override
        if negative := [order for order in override if order < 0]:
            raise ValueError(f"Invalid orders in inverse_exponent_override={dict(override)}: {negative}. All orders must be >= 0.")
        for order, exponents in override.items():
            per_dim = exponents if isinstance(exponents, Mapping) else {}
            if outside := [dim for dim in per_dim if not 0 <= dim <= max(order - 1, 0)]:
                raise ValueError(
                    f"Invalid dimensions in inverse_exponent_override[{order}]={dict(per_dim)}: {outside}. "
                    f"All dimensions must be within [0, {max(order - 1, 0)}]."
                )
            values = list(per_dim.values()) if isinstance(exponents, Mapping) else [exponents]
            if negative_values := [value for value in values if value < 0]:
                raise ValueError(
                    f"Invalid override value in inverse_exponent_override[{order}]={exponents}: {negative_values}. "
                    "All overrides must be >= 0."
                )

    def inverse_exponents(self, order: int) -> tuple[float, ...]:
        """The inverse root's exponent of each dimension of a block of ``order`` dimensions."""
        default = 1.0 / (2 * max(order, 1))
        exponents = self.inverse_exponent_override.get(order, {})
        if not isinstance(exponents, Mapping):
            return (float(exponents),) * order
        return tuple(float(exponents.get(dim, default)) for dim in range(order))


def _check_stability(config: EigendecompositionConfig) -> None:
    if not isinstance(config.rank_deficient_stability_config, (PerturbationConfig, PseudoInverseConfig)):
        raise ValueError(
            f"Invalid rank_deficient_stability_config: {type(config.rank_deficient_stability_config).__name__} is not "
            "implemented; use PerturbationConfig or PseudoInverseConfig"
        )


@dataclass(frozen=True, kw_only=True)
class RootInvShampooPreconditionerConfig(ShampooPreconditionerConfig):
    """Shampoo that keeps each factor's inverse root (``inv_factor_matrices``); the default.

    Attributes:
        amortized_computation_config: How the roots are computed (``EigenConfig``).
        inv_factor_matrix_dtype: The roots' storage dtype; None (the reference's behaviour) is
            the parameter's dtype. This package's addition.

    Raises:
        ValueError: Another root computation than ``EigenConfig`` (not implemented here yet), or a
            dtype outside ``PRECONDITIONER_DTYPES``.
    """

    amortized_computation_config: RootInvConfig = DefaultEigenConfig
    inv_factor_matrix_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        root_config = self.amortized_computation_config
        if not isinstance(root_config, (EigenConfig, CoupledNewtonConfig, CoupledHigherOrderConfig)):
            raise ValueError(
                f"Invalid amortized_computation_config: {type(root_config).__name__} is not "
                "implemented; use EigenConfig, CoupledNewtonConfig or CoupledHigherOrderConfig"
            )
        if isinstance(root_config, EigenConfig):
            _check_stability(root_config)
        if self.inv_factor_matrix_dtype is not None and self.inv_factor_matrix_dtype not in PRECONDITIONER_DTYPES:
            raise ValueError(
                f"Invalid inv_factor_matrix_dtype: {self.inv_factor_matrix_dtype}. Must be one of {PRECONDITIONER_DTYPES}."
            )


# The constructor's default, as in the reference.
DefaultShampooConfig = RootInvShampooPreconditionerConfig()


def _check_eigendecomposition(config: MatrixFunctionConfig) -> None:
    """An ``eigh`` or QR eigendecomposition stabilised by perturbation or a pseudo-inverse: what is implemented."""
    if not isinstance(config, (EighEigendecompositionConfig, QREigendecompositionConfig)):
        raise ValueError(
            f"Invalid amortized_computation_config: {type(config).__name__} is not implemented; use "
            "EighEigendecompositionConfig or QREigendecompositionConfig"
        )
    _check_stability(config)



@dataclass(frozen=True, kw_only=True)
class EigendecomposedShampooPreconditionerConfig(ShampooPreconditionerConfig):
    """Shampoo that keeps each factor's eigendecomposition (``factor_matrices_eigenvectors``,
    ``factor_matrices_eigenvalues``, in the parameter's dtype) and forms the inverse roots from it
    at every step.

    Attributes:
        amortized_computation_config: The eigendecomposition: ``eigh`` (the default; with a
            ``tolerance``, skipped while the last eigenvectors still fit) or the QR algorithm.

    Raises:
        ValueError: Another matrix function, or another stability config than ``PerturbationConfig``.
    """

    amortized_computation_config: EigendecompositionConfig = DefaultEigendecompositionConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_eigendecomposition(self.amortized_computation_config)


@dataclass(frozen=True, kw_only=True)
class EigenvalueCorrectedShampooPreconditionerConfig(AmortizedPreconditionerConfig):
    """Eigenvalue-corrected Shampoo (SOAP): Adam's second moment kept in the eigenbasis of the
    factors (``corrected_eigenvalues``), the eigenvectors recomputed every
    ``precondition_frequency`` steps.

    Attributes:
        amortized_computation_config: The eigendecomposition (``eigh`` by default;
            ``DefaultSOAPConfig`` uses one QR step from the last eigenvectors).
        ignored_basis_change_dims: Per block order, the dimensions not rotated (no factor matrix),
            e.g. ``{2: [1]}``.
        inverse_exponent_override: Per block order, the exponent of the corrected eigenvalues'
            root (default 1/2, Adam's).

    Raises:
        ValueError: A negative order or exponent, a dimension outside ``[0, order - 1]``, or a
            matrix function other than an ``eigh`` or QR eigendecomposition with ``PerturbationConfig``.
    """

    amortized_computation_config: EigendecompositionConfig = DefaultEigendecompositionConfig
    # Not hashed (dicts are not hashable); compared.
    ignored_basis_change_dims: Mapping[int, Sequence[int]] = field(default_factory=dict, hash=False)
    inverse_exponent_override: Mapping[int, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_eigendecomposition(self.amortized_computation_config)
        ignored = self.ignored_basis_change_dims
        if negative := [order for order in ignored if order < 0]:
            raise ValueError(f"Invalid orders in ignored_basis_change_dims={dict(ignored)}: {negative}. All orders must be >= 0.")
        for order, dims in ignored.items():
            if outside := [dim for dim in dims if not 0 <= dim <= max(order - 1, 0)]:
                raise ValueError(
                    f"Invalid dimensions in ignored_basis_change_dims[{order}]={list(dims)}: {outside}. "
                    f"All dimensions must be within [0, {max(order - 1, 0)}]."
                )
            if len(set(dims)) != len(dims):
                raise ValueError(f"Invalid ignored_basis_change_dims[{order}]={list(dims)}: duplicate dimensions.")
        override = self.inverse_exponent_override
        if negative := [order for order in override if order < 0]:
            raise ValueError(f"Invalid orders in inverse_exponent_override={dict(override)}: {negative}. All orders must be >= 0.")
        if negative_values := [value for value in override.values() if value < 0]:
            raise ValueError(
                f"Invalid override value in inverse_exponent_override={dict(override)}: {negative_values}. "
                "All overrides must be >= 0."
            )


DefaultEigenvalueCorrectedShampooConfig = EigenvalueCorrectedShampooPreconditionerConfig()
DefaultSOAPConfig = EigenvalueCorrectedShampooPreconditionerConfig(amortized_computation_config=QREigendecompositionConfig())


def _unit_sign_scale(grad: torch.Tensor) -> float:
    return 1.0


@dataclass(frozen=True, kw_only=True)
class SignDescentPreconditionerConfig(PreconditionerConfig):
    """Sign descent: the direction is ``sign(m) * scale_fn(m)`` of the filtered gradient block
    ``m`` (e.g. ``scale_fn=lambda m: m.abs().sum()`` is steepest descent in the max norm). No
    preconditioner state; ``betas[1]``, ``epsilon`` and ``precondition_frequency`` have no effect.

    Attributes:
        scale_fn: The scale of a block's signs.
    """

    scale_fn: Callable[[torch.Tensor], float | torch.Tensor] = _unit_sign_scale


DefaultSignDescentPreconditionerConfig = SignDescentPreconditionerConfig()


@dataclass(frozen=True, kw_only=True)
class SpectralDescentPreconditionerConfig(PreconditionerConfig):
    """Spectral descent (as in Muon): the direction is the filtered gradient block orthogonalized.
    Every block must be 2-D: the optimizer merges dimensions down to 2
    (``target_parameter_dimensionality`` 2; ``max_preconditioner_dim=math.inf`` guarantees it).
    No preconditioner state; ``betas[1]``, ``epsilon`` and ``precondition_frequency`` have no effect.

    Attributes:
        orthogonalization_config: Newton-Schulz (the default) or the SVD.
    """

    orthogonalization_config: OrthogonalizationConfig = DefaultNewtonSchulzOrthogonalizationConfig


DefaultSpectralDescentPreconditionerConfig = SpectralDescentPreconditionerConfig()


@dataclass(frozen=True)
class ShampooPT2CompileConfig:
    """Compiles each block's step with ``torch.compile`` (PyTorch 2); the fields are the
    arguments of ``torch.compile`` of the same names, with its defaults.

    Attributes:
        fullgraph: Fail on a graph break instead of falling back to Python.
        dynamic: Compile for dynamic shapes (None: after a shape changes).
        backend: The compiler: ``"inductor"`` (the default), ``"eager"``, ``"aot_eager"`` or a
            backend callable.
        mode: ``"default"``, ``"reduce-overhead"``, ``"max-autotune"`` ... (None: the default).
        options: Backend options.
        disable: Turn compilation off (for debugging).
    """

    fullgraph: bool = False
    dynamic: bool | None = None
    backend: str | Callable[..., object] = "inductor"
    mode: str | None = None
    options: Mapping[str, str | int | bool] | None = None
    disable: bool = False

    def compile(self, function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``function`` compiled with these settings."""
        return torch.compile(
            function,
            fullgraph=self.fullgraph,
            dynamic=self.dynamic,
            backend=self.backend,
            mode=self.mode,
            # pyre-ignore[6]: torch.compile types its options as a dict of backend settings
            options=dict(self.options) if self.options is not None else None,
            disable=self.disable,
        )


def uses_pseudo_inverse(config: PreconditionerConfig) -> bool:
    """Whether ``config``'s eigendecompositions make pseudo-inverses (``PseudoInverseConfig``)."""
    computation = config.amortized_computation_config if isinstance(config, AmortizedPreconditionerConfig) else None
    return isinstance(computation, EigendecompositionConfig) and isinstance(
        computation.rank_deficient_stability_config, PseudoInverseConfig
    )


# Every config class of this package: what a checkpoint may hold as a value (``checkpoint.values``).
CONFIG_CLASSES: tuple[type[object], ...] = (
    SGDPreconditionerConfig,
    AdaGradPreconditionerConfig,
    RMSpropPreconditionerConfig,
    AdamPreconditionerConfig,
    SGDGraftingConfig,
    AdaGradGraftingConfig,
    RMSpropGraftingConfig,
    AdamGraftingConfig,
    SingleDeviceDistributedConfig,
    DDPDistributedConfig,
    FullyShardDistributedConfig,
    HybridShardDistributedConfig,
    PerturbationConfig,
    PseudoInverseConfig,
    EighEigendecompositionConfig,
    EigenConfig,
    QREigendecompositionConfig,
    CoupledNewtonConfig,
    CoupledHigherOrderConfig,
    SVDOrthogonalizationConfig,
    NewtonSchulzOrthogonalizationConfig,
    RootInvShampooPreconditionerConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    SignDescentPreconditionerConfig,
    SpectralDescentPreconditionerConfig,
)

# Every enum of this package: what a checkpoint may hold as a value (``checkpoint.values``).
ENUM_CLASSES: tuple[type[enum.Enum], ...] = (FSDPParamAssignmentStrategy,)

# The kinds of configs: a checkpoint's config fills a template's of the same kind (a
# DDPDistributedConfig saved, a FullyShardDistributedConfig in the template of the resume).
CONFIG_KINDS: tuple[type[object], ...] = (
    GraftingConfig,
    DistributedConfig,
    PreconditionerConfig,
    MatrixFunctionConfig,
    RankDeficientStabilityConfig,
)



# The per-group hyperparameters, in the order of ``DistributedShampoo``'s constructor.
HYPERPARAMETERS: tuple[str, ...] = (
    "lr",
    "betas",
    "beta3",
    "epsilon",
    "momentum",
    "dampening",
    "weight_decay",
    "max_preconditioner_dim",
    "precondition_frequency",
    "start_preconditioning_step",
    "use_nesterov",
    "use_bias_correction",
    "use_decoupled_weight_decay",
    "use_pin_memory",
)


@dataclass(frozen=True)
class ShampooHyperparameters:
    """The validated hyperparameters of one parameter group (see ``DistributedShampoo``)."""

    lr: float
    beta1: float
    beta2: float
    beta3: float
    epsilon: float
    momentum: float
    dampening: float
    weight_decay: float
    max_preconditioner_dim: int | float
    precondition_frequency: int
    start_preconditioning_step: int
    use_nesterov: bool
    use_bias_correction: bool
    use_decoupled_weight_decay: bool
    use_pin_memory: bool

    @property
    def first_preconditioned_step(self) -> int:
        """The first step that uses Shampoo's direction (-1 means ``precondition_frequency``)."""
        return self.precondition_frequency if self.start_preconditioning_step == -1 else self.start_preconditioning_step

    @property
    def current_gradient_beta(self) -> float:
        """The EMA coefficient of the filtered gradient a step uses (``beta3``; -1 means ``beta1``)."""
        return self.beta1 if self.beta3 == -1.0 else self.beta3

    def computes_roots_at(self, step: int) -> bool:
        """Whether the inverse roots are computed at ``step``: at the first preconditioned step,
        then at every later multiple of ``precondition_frequency`` (the reference's schedule)."""
        start = self.first_preconditioned_step
        return step == start or (step > start and step % self.precondition_frequency == 0)

    @classmethod
    def from_group(cls, group: Mapping[str, object], pseudo_inverse: bool = False) -> "ShampooHyperparameters":
        """Reads and validates a parameter group's hyperparameters.

        Args:
            group: The parameter group.
            pseudo_inverse: The preconditioner uses ``PseudoInverseConfig``: ``epsilon`` must be 0
                (otherwise > 0).

        Raises:
            ValueError: Naming the first invalid hyperparameter and its allowed range.
        """
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r}. Must be a pair (beta1, beta2).")
        values = cls(
            lr=_number("lr", group["lr"]),
            beta1=_number("betas[0]", betas[0]),
            beta2=_number("betas[1]", betas[1]),
            beta3=_number("beta3", group["beta3"]),
            epsilon=_number("epsilon", group["epsilon"]),
            momentum=_number("momentum", group["momentum"]),
            dampening=_number("dampening", group["dampening"]),
            weight_decay=_number("weight_decay", group["weight_decay"]),
            max_preconditioner_dim=_dimension("max_preconditioner_dim", group["max_preconditioner_dim"]),
            precondition_frequency=_integer("precondition_frequency", group["precondition_frequency"]),
            start_preconditioning_step=_integer("start_preconditioning_step", group["start_preconditioning_step"]),
            use_nesterov=_flag("use_nesterov", group["use_nesterov"]),
            use_bias_correction=_flag("use_bias_correction", group["use_bias_correction"]),
            use_decoupled_weight_decay=_flag("use_decoupled_weight_decay", group["use_decoupled_weight_decay"]),
            use_pin_memory=_flag("use_pin_memory", group.get("use_pin_memory", False)),
        )
        checks = (
            (values.lr >= 0.0, f"Invalid lr: {values.lr}. Must be >= 0."),
            (0.0 <= values.beta1 < 1.0, f"Invalid betas[0]: {values.beta1}. Must be in [0, 1)."),
            (0.0 < values.beta2 <= 1.0, f"Invalid betas[1]: {values.beta2}. Must be in (0, 1]."),
            (values.beta3 == -1.0 or 0.0 <= values.beta3 < 1.0, f"Invalid beta3: {values.beta3}. Must be -1 or in [0, 1)."),
            (
                values.epsilon == 0.0 if pseudo_inverse else values.epsilon > 0.0,
                f"Invalid epsilon: {values.epsilon}. Must be == 0.0 when PseudoInverseConfig is used."
                if pseudo_inverse
                else f"Invalid epsilon: {values.epsilon}. Must be > 0.",
            ),
            (0.0 <= values.momentum < 1.0, f"Invalid momentum: {values.momentum}. Must be in [0, 1)."),
            (0.0 <= values.dampening < 1.0, f"Invalid dampening: {values.dampening}. Must be in [0, 1)."),
            (values.weight_decay >= 0.0, f"Invalid weight_decay: {values.weight_decay}. Must be >= 0."),
            (
                values.precondition_frequency >= 1,
                f"Invalid precondition_frequency: {values.precondition_frequency}. Must be >= 1.",
            ),
            (
                values.start_preconditioning_step == -1
                or values.start_preconditioning_step >= values.precondition_frequency,
                f"Invalid start_preconditioning_step: {values.start_preconditioning_step}. Must be -1 or "
                f">= precondition_frequency ({values.precondition_frequency}).",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return values


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r}. Must be a number.")
    return float(value)


def _dimension(name: str, value: object) -> int | float:
    _check_int_or_inf(name, value)
    return value  # pyre-ignore[7]: an int or math.inf, checked above


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Invalid {name}: {value!r}. Must be an int.")
    return value


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r}. Must be a bool.")
    return value
