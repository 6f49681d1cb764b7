# pyre-strict
"""Frozen configuration dataclasses of ``DistributedShampoo`` and the names of its state keys."""

from collections.abc import Mapping
from dataclasses import dataclass

import torch

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


@dataclass(frozen=True)
class DDPDistributedConfig:
    """Distributes Shampoo blocks over the ranks of the default process group.

    Attributes:
        num_trainers_per_group: Ranks that share one copy of the optimizer state; ``-1`` means all
            of them. With ``k`` < world size, the world is cut into groups of ``k`` consecutive
            ranks, each group holds the whole state, and updates are all-gathered within a group.
        communication_dtype: The dtype of the all-gathered updates (float32, bfloat16 or
            float16). A lower precision halves the traffic and rounds every update to it.

    Raises:
        ValueError: If ``num_trainers_per_group`` is neither -1 nor >= 1, or the dtype is not one
            of ``COMMUNICATION_DTYPES``.
    """

    num_trainers_per_group: int = -1
    communication_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.num_trainers_per_group != -1 and self.num_trainers_per_group < 1:
            raise ValueError(
                f"DDPDistributedConfig: num_trainers_per_group must be -1 or >= 1, got {self.num_trainers_per_group}"
            )
        if self.communication_dtype not in COMMUNICATION_DTYPES:
            raise ValueError(
                f"DDPDistributedConfig: communication_dtype must be one of {COMMUNICATION_DTYPES}, "
                f"got {self.communication_dtype}"
            )


@dataclass(frozen=True)
class FullyShardDistributedConfig:
    """Distributes Shampoo blocks over the ranks of an FSDP2 (``fully_shard``) model.

    The parameters must be ``fully_shard``'s DTensors: ``Shard(0)`` on one 1-D device mesh,
    shards of any sizes (empty ones included). Unlike the reference implementation, which cuts
    blocks from each rank's local shard, the blocks are those of the global shapes, exactly as in
    one process; each is owned by one rank of the mesh, which receives the block's gradient from
    the ranks holding its rows and sends its update back to them. So the optimizer's state, and
    its trajectory, do not depend on the number of ranks, and its checkpoints load under FSDP2,
    DDP or one process at any world size. Gradients and updates travel in the parameters'
    compute dtype (float32, or float64 for float64 parameters), so nothing is rounded.
    """


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
    DDPDistributedConfig,
    FullyShardDistributedConfig,
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
    max_preconditioner_dim: int
    precondition_frequency: int
    start_preconditioning_step: int
    use_nesterov: bool
    use_bias_correction: bool
    use_decoupled_weight_decay: bool

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
    def from_group(cls, group: Mapping[str, object]) -> "ShampooHyperparameters":
        """Reads and validates a parameter group's hyperparameters.

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
            max_preconditioner_dim=_integer("max_preconditioner_dim", group["max_preconditioner_dim"]),
            precondition_frequency=_integer("precondition_frequency", group["precondition_frequency"]),
            start_preconditioning_step=_integer("start_preconditioning_step", group["start_preconditioning_step"]),
            use_nesterov=_flag("use_nesterov", group["use_nesterov"]),
            use_bias_correction=_flag("use_bias_correction", group["use_bias_correction"]),
            use_decoupled_weight_decay=_flag("use_decoupled_weight_decay", group["use_decoupled_weight_decay"]),
        )
        checks = (
            (values.lr >= 0.0, f"Invalid lr: {values.lr}. Must be >= 0."),
            (0.0 <= values.beta1 < 1.0, f"Invalid betas[0]: {values.beta1}. Must be in [0, 1)."),
            (0.0 < values.beta2 <= 1.0, f"Invalid betas[1]: {values.beta2}. Must be in (0, 1]."),
            (values.beta3 == -1.0 or 0.0 <= values.beta3 < 1.0, f"Invalid beta3: {values.beta3}. Must be -1 or in [0, 1)."),
            (values.epsilon > 0.0, f"Invalid epsilon: {values.epsilon}. Must be > 0."),
            (0.0 <= values.momentum < 1.0, f"Invalid momentum: {values.momentum}. Must be in [0, 1)."),
            (0.0 <= values.dampening < 1.0, f"Invalid dampening: {values.dampening}. Must be in [0, 1)."),
            (values.weight_decay >= 0.0, f"Invalid weight_decay: {values.weight_decay}. Must be >= 0."),
            (
                values.max_preconditioner_dim >= 1,
                f"Invalid max_preconditioner_dim: {values.max_preconditioner_dim}. Must be >= 1.",
            ),
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


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Invalid {name}: {value!r}. Must be an int.")
    return value


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r}. Must be a bool.")
    return value
