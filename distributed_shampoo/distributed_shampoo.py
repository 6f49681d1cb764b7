# pyre-strict
"""``DistributedShampoo``: blocked Shampoo with grafting, optionally distributed over DDP or FSDP2 ranks."""

import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import accumulate
from typing import cast, Literal, TypeVar

import torch
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import ParamsT

from distributed_shampoo.checkpoint.plan import flattened_paths, local_data
from distributed_shampoo.distributor.block_distributor import BlockDistributor, DDPDistributor
from distributed_shampoo.distributor.block_layout import BlockSpec, param_layouts, ParamLayout
from distributed_shampoo.distributor.fully_shard_distributor import FullyShardDistributor
from distributed_shampoo.distributor.shampoo_block_info import BlockInfo
from distributed_shampoo.preconditioner.descent import descent_direction
from distributed_shampoo.preconditioner.grafting import Grafting
from distributed_shampoo.preconditioner.shampoo_preconditioner import shampoo_preconditioner, ShampooPreconditioner
from distributed_shampoo.shampoo_types import (
    block_key,
    DDPDistributedConfig,
    DefaultShampooConfig,
    DefaultSingleDeviceDistributedConfig,
    DistributedConfig,
    FullyShardDistributedConfig,
    GraftingConfig,
    HybridShardDistributedConfig,
    HYPERPARAMETERS,
    PRECONDITIONER_DTYPES,
    AmortizedPreconditionerConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    PreconditionerConfig,
    RootInvShampooPreconditionerConfig,
    ShampooHyperparameters,
    SignDescentPreconditionerConfig,
    SpectralDescentPreconditionerConfig,
    ShampooPT2CompileConfig,
    SingleDeviceDistributedConfig,
    STEP,
    uses_pseudo_inverse,
)
from distributed_shampoo.utils.optimizer_modules import OptimizerModule
from distributed_shampoo.utils.shampoo_checkpoint_utils import flatten, Key, unflatten, update_param_state_dict_object

# The configs every parameter group holds, under the reference's keys (grafting and preconditioner
# configs may differ per group; the distribution is the constructor's).
_GROUP_CONFIGS: tuple[str, ...] = ("grafting_config", "distributed_config", "preconditioner_config")
# The structures ``distributed_state_dict`` returns (see there).
StateDictLayout = Literal["reference", "nested"]

# The preconditioner configs implemented.
_PRECONDITIONER_CONFIGS: tuple[type[PreconditionerConfig], ...] = (
    RootInvShampooPreconditionerConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    SignDescentPreconditionerConfig,
    SpectralDescentPreconditionerConfig,
)


# A parameter's state: its step count and the blocks this rank owns (see ``distributed_state_dict``).
ParamState = dict[Key, object]
_K = TypeVar("_K", bound=Key)


class BlockState(OptimizerModule):
    """The state of one block, owned by one rank (per group of trainers).

    Its state dict is ``{"shampoo": {...}, "adagrad": ..., "filtered_grad": ..., "momentum": ...}``;
    the attribute names are the state keys, and buffers a configuration does not need are None and
    absent from the state dict (no ``shampoo`` for sign and spectral descent, no grafting state
    for SGD grafting or none, no ``filtered_grad`` when ``betas[0] == 0``, no ``momentum`` when
    ``momentum == 0``). ``adagrad`` is the reference implementation's name for the grafting
    accumulator, whichever the grafting.
    """

    def __init__(
        self,
        block_info: BlockInfo,
        block_shape: tuple[int, ...],
        hyperparameters: ShampooHyperparameters,
        grafting: Grafting | None,
        preconditioner_config: PreconditionerConfig,
    ) -> None:
        param: torch.Tensor = block_info.param

        def zeros() -> torch.Tensor:
            return block_info.allocate_zeros_tensor(size=block_shape, dtype=param.dtype, device=param.device)

        # None for sign and spectral descent, which keep no preconditioner state.
        self.shampoo: ShampooPreconditioner | None = (
            shampoo_preconditioner(block_info, block_shape, preconditioner_config)
            if isinstance(preconditioner_config, AmortizedPreconditionerConfig)
            else None
        )
        self.adagrad: torch.Tensor | None = zeros() if grafting is not None and grafting.has_state else None
        self.filtered_grad: torch.Tensor | None = zeros() if hyperparameters.beta1 != 0.0 else None
        self.momentum: torch.Tensor | None = zeros() if hyperparameters.momentum != 0.0 else None


def _group_preconditioner_config(config: object, preconditioner_dtype: torch.dtype | None, group_index: int) -> PreconditionerConfig:
    """A group's preconditioner config, checked, with ``preconditioner_dtype`` applied.

    Raises:
        ValueError: Not one of the implemented configs, or an invalid ``preconditioner_dtype``.
    """
    if not isinstance(config, _PRECONDITIONER_CONFIGS):
        raise ValueError(
            f"DistributedShampoo: preconditioner_config {type(config).__name__} of parameter group {group_index} is not "
            f"implemented; use one of {[config.__name__ for config in _PRECONDITIONER_CONFIGS]}"
        )
    if preconditioner_dtype is None or not isinstance(config, AmortizedPreconditionerConfig):
        return config
    if preconditioner_dtype not in PRECONDITIONER_DTYPES:
        raise ValueError(f"Invalid preconditioner_dtype: {preconditioner_dtype}. Must be one of {PRECONDITIONER_DTYPES}.")
    config = dataclasses.replace(config, factor_matrix_dtype=preconditioner_dtype)
    if isinstance(config, RootInvShampooPreconditionerConfig):
        config = dataclasses.replace(config, inv_factor_matrix_dtype=preconditioner_dtype)
    return config


@functools.cache  # blocks of one shape and group share it: a few distinct calls per model
def block_state_nbytes(
    block_shape: tuple[int, ...],
    param_dtype: torch.dtype,
    hyperparameters: ShampooHyperparameters,
    grafting: Grafting | None,
    preconditioner_config: PreconditionerConfig,
) -> int:
    """The bytes of one block's optimizer state: what block ownership balances.

    Measured on a ``BlockState`` allocated on the meta device, so it is exactly what the block's
    owner allocates.
    """
    meta_param = torch.empty(0, dtype=param_dtype, device="meta")
    state = BlockState(BlockInfo(meta_param, (0, block_key(0))), block_shape, hyperparameters, grafting, preconditioner_config)
    return _nbytes(state.state_dict())


def _nbytes(value: object) -> int:
    """The bytes of the tensors in a nested state dict."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, Mapping):
        return sum(_nbytes(item) for item in value.values())
    return 0


class DistributedShampoo(torch.optim.Optimizer):
    """Shampoo with a Kronecker-factored preconditioner per block of each parameter.

    Each parameter is reshaped with ``merge_small_dims(shape, max_preconditioner_dim)`` and cut
    with ``multi_dim_split`` into blocks no longer than ``max_preconditioner_dim`` along any
    dimension. The block list depends only on the parameters' shapes and the hyperparameters, so
    it is the same at every world size; with a ``DDPDistributedConfig`` each rank keeps the state
    of, and computes the update for, only the blocks ``distribute_buffer_sizes`` gives it, and the
    updates are all-gathered so that every rank applies the same step.

    At step ``t`` (the parameter group's calls of ``step()``, counting from 1, whether or not a
    parameter had a gradient), for each block with gradient ``G``:

    1. ``G += weight_decay * W`` unless ``use_decoupled_weight_decay``.
    2. Each factor ``F_i = beta2 F_i + (1 - beta2) G_(i) G_(i)^T`` (a plain sum when ``beta2 == 1``),
       and the grafting accumulator is updated with ``G``.
    3. The step uses ``beta3 M + (1 - beta3) G`` (``beta3 = beta1`` when -1: the updated
       ``M``), divided by ``1 - beta3 beta1^(t-1)`` with ``use_bias_correction``; then
       ``M = beta1 M + (1 - beta1) G``. (``M = G`` when ``beta1 == 0``.)
    4. At ``t = start_preconditioning_step`` and at every later multiple of
       ``precondition_frequency``: ``R_i = (F_i / c + epsilon I)^(-1/(2k))`` for a block of order
       ``k`` (computed in the factors' precision; exponents per ``inverse_exponent_override``),
       with ``c = 1 - beta2^t`` if ``use_bias_correction`` and ``beta2 < 1``, else 1.
    5. Direction ``D``: from step ``start_preconditioning_step`` on (-1 means
       ``precondition_frequency``), ``M`` multiplied by every ``R_i`` along dimension ``i``, times
       ``|grafting direction| / (|D| + 1e-16)`` when grafting; before it, the grafting direction of ``M``,
       or ``M`` itself without grafting.
    6. ``D += weight_decay * W`` if ``use_decoupled_weight_decay``; with momentum,
       ``B = momentum B + (1 - dampening) D`` and ``D = B`` (with Nesterov,
       ``D = (1 - dampening) D + momentum B``).
    7. ``W -= lr * D``.

    Args:
        params: Parameters or parameter groups, as for any ``torch.optim.Optimizer``. Groups may
            override every hyperparameter below except the configs and ``preconditioner_dtype``.
        lr: The learning rate (>= 0).
        betas: ``(beta1, beta2)``: the gradient filter in [0, 1) and the factor EMA in (0, 1]
            (1 sums the factors, as AdaGrad does).
        beta3: The filter coefficient of the current step's gradient average, in [0, 1); -1
            means ``beta1`` (e.g. ``beta1 ** 2`` gives a NAdam-like step), as in the reference.
        epsilon: Added to every eigenvalue of a factor before its inverse root (> 0).
        momentum: Heavy-ball momentum in [0, 1).
        dampening: Momentum dampening in [0, 1).
        weight_decay: L2 penalty (>= 0).
        max_preconditioner_dim: The largest block dimension: an int >= 1, or ``math.inf`` for
            no blocking (with ``target_parameter_dimensionality`` 1, a parameter then becomes one
            vector with one full-size factor, as in the reference).
        precondition_frequency: Steps between inverse-root computations (>= 1).
        start_preconditioning_step: The first step that uses Shampoo's direction; -1 or
            >= ``precondition_frequency``.
        use_nesterov: Nesterov momentum (needs ``momentum > 0``).
        use_bias_correction: Bias-correct the filtered gradient and (for ``beta2 < 1``) the factors.
        use_decoupled_weight_decay: AdamW-style weight decay instead of an L2 term in the gradient.
        grafting_config: The grafted diagonal optimizer, or None for none.
        use_pin_memory: Accepted and kept in the parameter groups, as in the reference (which
            pins its learning-rate tensor with it); this step copies nothing to a device, so it
            changes nothing here.
        shampoo_pt2_compile_config: Compile each block's step with ``torch.compile`` (these
            settings), or None to run it eagerly.
        distributed_config: One process (``SingleDeviceDistributedConfig``, the default, or
            None), blocks distributed over DDP ranks (``DDPDistributedConfig``) or over an FSDP2
            model's ranks (``FullyShardDistributedConfig``, ``HybridShardDistributedConfig`` for
            HSDP); its
            ``target_parameter_dimensionality`` steers the merging of small dimensions.
        preconditioner_config: ``RootInvShampooPreconditionerConfig`` (the default,
            ``DefaultShampooConfig``): the factors' dtype (``factor_matrix_dtype``, float32), the
            roots' (``inv_factor_matrix_dtype``, None: the parameter's), ``EigenConfig`` (retry in
            float64, offload device, perturbation), ``inverse_exponent_override`` and
            ``num_tolerated_failed_amortized_computations``. Or, as in the reference,
            ``EigendecomposedShampooPreconditionerConfig`` (the same roots, kept as
            eigendecompositions), ``EigenvalueCorrectedShampooPreconditionerConfig`` (SOAP: Adam in
            the factors' eigenbasis, replacing steps 4 and 5's roots), or
            ``SignDescentPreconditionerConfig`` / ``SpectralDescentPreconditionerConfig`` (no
            factors: step 5's direction is ``M``'s signs, or ``M`` orthogonalized); see
            ``docs/optimizer.md``.
        preconditioner_dtype: This package's shorthand: the storage dtype of the factors and the
            roots both (float64, float32, bfloat16 or float16), replacing the configs'. Factors are
            updated, and roots computed, in float32, or float64 when stored in float64.

    As in the reference, a parameter group may set its own ``grafting_config`` and
    ``preconditioner_config``; the groups hold all three configs under these keys (a group's
    ``distributed_config`` must be the constructor's: one distribution serves every group).
    Changing them after construction changes nothing, as in the reference.

    Raises:
        ValueError: An invalid hyperparameter or config (named in the message), a group with
            another ``distributed_config``, or a non-contiguous parameter.
        RuntimeError: ``distributed_config`` is given before ``torch.distributed`` is initialised.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 1.0),
        beta3: float = -1.0,
        epsilon: float = 1e-12,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        max_preconditioner_dim: int | float = 1024,
        precondition_frequency: int = 1,
        start_preconditioning_step: int = -1,
        use_nesterov: bool = False,
        use_bias_correction: bool = True,
        use_decoupled_weight_decay: bool = True,
        grafting_config: GraftingConfig | None = None,
        use_pin_memory: bool = False,
        shampoo_pt2_compile_config: ShampooPT2CompileConfig | None = None,
        distributed_config: DistributedConfig | None = DefaultSingleDeviceDistributedConfig,
        preconditioner_config: PreconditionerConfig = DefaultShampooConfig,
        preconditioner_dtype: torch.dtype | None = None,
    ) -> None:
        defaults: dict[str, object] = dict(
            zip(
                HYPERPARAMETERS,
                (
                    lr,
                    betas,
                    beta3,
                    epsilon,
                    momentum,
                    dampening,
                    weight_decay,
                    max_preconditioner_dim,
                    precondition_frequency,
                    start_preconditioning_step,
                    use_nesterov,
                    use_bias_correction,
                    use_decoupled_weight_decay,
                    use_pin_memory,
                ),
            )
        )
        super().__init__(params, defaults)
        # As the reference, a group may set its own grafting and preconditioner configs; they
        # stay in the group under the reference's keys.
        for index, group in enumerate(self.param_groups):
            group.setdefault("grafting_config", grafting_config)
            if group.setdefault("distributed_config", distributed_config) != distributed_config:
                raise ValueError(
                    f"DistributedShampoo: parameter group {index} sets distributed_config={group['distributed_config']!r}; "
                    "every group is distributed by the constructor's"
                )
            config = _group_preconditioner_config(group.get("preconditioner_config", preconditioner_config), preconditioner_dtype, index)
            group["preconditioner_config"] = config
            if isinstance(config, (SignDescentPreconditionerConfig, SpectralDescentPreconditionerConfig)):
                # As the reference: these hyperparameters mean nothing to it, and roots "every step".
                warnings.warn(
                    f"DistributedShampoo: betas[1], epsilon and precondition_frequency have no effect with "
                    f"{type(config).__name__}; precondition_frequency is set to 1",
                    stacklevel=2,
                )
                group["precondition_frequency"] = 1
        self._group_configs: list[PreconditionerConfig] = [group["preconditioner_config"] for group in self.param_groups]
        self._group_graftings: list[Grafting | None] = [
            Grafting(group["grafting_config"]) if group["grafting_config"] is not None else None for group in self.param_groups
        ]
        self._group_pseudo_inverse: list[bool] = [uses_pseudo_inverse(config) for config in self._group_configs]
        self._params: list[torch.Tensor] = [param for group in self.param_groups for param in group["params"]]
        self._group_of: list[int] = [index for index, group in enumerate(self.param_groups) for _ in group["params"]]
        # Each group's first parameter: its state holds the group's step.
        self._group_firsts: list[int] = list(accumulate((len(group["params"]) for group in self.param_groups[:-1]), initial=0))
        group_hyperparameters = self._validated_groups(self.param_groups)
        for group, hyperparameters in zip(self.param_groups, group_hyperparameters):
            # As the reference: a group holds the values -1 stands for, which its state dict carries.
            group["beta3"] = hyperparameters.current_gradient_beta
            group["start_preconditioning_step"] = hyperparameters.first_preconditioned_step
        if any(group.use_nesterov and group.momentum == 0.0 for group in group_hyperparameters):
            # As the reference: a warning, not an error (the step runs without momentum).
            warnings.warn(
                "DistributedShampoo: use_nesterov is set but momentum is 0; continuing without momentum or Nesterov",
                stacklevel=2,
            )
        param_hyperparameters = self._per_param(group_hyperparameters)
        for param_index, param in enumerate(self._params):
            if not isinstance(param, DTensor) and not param.is_contiguous():
                raise ValueError(f"DistributedShampoo: parameter #{param_index} is not contiguous")
        # DTensor shapes are global: the blocks are the same under every distribution.
        target_dimensionality = distributed_config.target_parameter_dimensionality if distributed_config is not None else 1
        spectral = [isinstance(self._group_configs[group], SpectralDescentPreconditionerConfig) for group in self._group_of]
        if any(spectral) and target_dimensionality != 2:
            warnings.warn(
                f"DistributedShampoo: target_parameter_dimensionality {target_dimensionality} is not 2; spectral "
                "descent uses 2",
                stacklevel=2,
            )
            target_dimensionality = 2
        layouts, blocks = param_layouts(
            [tuple(param.shape) for param in self._params],
            [hyperparameters.max_preconditioner_dim for hyperparameters in param_hyperparameters],
            target_dimensionality,
        )
        if any(spectral[block.param_index] and len(block.shape) != 2 for block in blocks):
            raise ValueError(
                "Spectral descent can only be used for 2D parameters, or parameters that have been reshaped to 2D. "
                "To guarantee that all >2D parameters are reshaped to 2D, set max_preconditioner_dim=math.inf and "
                "distributed_config.target_parameter_dimensionality=2."
            )
        self._layouts: list[ParamLayout] = layouts
        self._blocks: list[BlockSpec] = blocks
        # Ownership balances the blocks' state bytes, so it needs them all before any rank
        # allocates its own blocks' state.
        state_nbytes = [
            block_state_nbytes(
                block.shape, self._params[block.param_index].dtype, param_hyperparameters[block.param_index],
                *self._configs_of(block.param_index),
            )
            for block in self._blocks
        ]
        self._distributor: BlockDistributor = self._make_distributor(distributed_config, state_nbytes)
        self._block_step: Callable[..., torch.Tensor] = (
            shampoo_pt2_compile_config.compile(self._block_direction) if shampoo_pt2_compile_config is not None else self._block_direction
        )
        self._block_states: dict[int, BlockState] = {}
        # One step count per parameter group, as in the reference implementation: it counts the
        # group's calls of ``step()``, whether or not a parameter had a gradient.
        self._group_steps: list[torch.Tensor] = [torch.zeros((), dtype=torch.int64) for _ in self.param_groups]
        for param_index, (param, hyperparameters) in enumerate(zip(self._params, param_hyperparameters)):
            for position in self._layouts[param_index].block_positions:
                if self._distributor.is_owned(position):
                    block = self._blocks[position]
                    self._block_states[position] = BlockState(
                        BlockInfo(param, (param_index, block_key(block.block_index))),
                        block.shape,
                        hyperparameters,
                        *self._configs_of(param_index),
                    )
            self.state[param] = self._param_state(param_index)

    def _configs_of(self, param_index: int) -> tuple[Grafting | None, PreconditionerConfig]:
        """The grafting and the preconditioner config of a parameter's group."""
        group = self._group_of[param_index]
        return self._group_graftings[group], self._group_configs[group]

    def _validated_groups(self, groups: Sequence[Mapping[str, object]]) -> list[ShampooHyperparameters]:
        """Each group's hyperparameters, validated (``epsilon`` 0 where the group's preconditioner
        makes pseudo-inverses)."""
        return [ShampooHyperparameters.from_group(group, pseudo) for group, pseudo in zip(groups, self._group_pseudo_inverse)]

    def _make_distributor(self, config: DistributedConfig | None, state_nbytes: list[int]) -> BlockDistributor:
        if not isinstance(config, (SingleDeviceDistributedConfig, DDPDistributedConfig, FullyShardDistributedConfig, type(None))):
            raise ValueError(
                f"DistributedShampoo: distributed_config {type(config).__name__} is not supported; use "
                "SingleDeviceDistributedConfig, DDPDistributedConfig, FullyShardDistributedConfig or HybridShardDistributedConfig"
            )
        if isinstance(config, HybridShardDistributedConfig):
            return FullyShardDistributor(self._params, self._blocks, self._layouts, state_nbytes, hybrid=True, device_mesh=config.device_mesh)
        if isinstance(config, FullyShardDistributedConfig):
            return FullyShardDistributor(self._params, self._blocks, self._layouts, state_nbytes)
        sharded = [index for index, param in enumerate(self._params) if isinstance(param, DTensor)]
        if sharded:
            raise ValueError(
                f"DistributedShampoo: parameters #{sharded} are DTensors; pass "
                "distributed_config=FullyShardDistributedConfig() for fully_shard models"
            )
        ddp = config if isinstance(config, DDPDistributedConfig) else None
        return DDPDistributor(self._blocks, self._layouts, state_nbytes, ddp, self._params[0].device)

    def _per_param(self, per_group: list[ShampooHyperparameters]) -> list[ShampooHyperparameters]:
        """Each parameter's group's hyperparameters, in parameter order."""
        return [hyperparameters for group, hyperparameters in zip(self.param_groups, per_group) for _ in group["params"]]

    def bytes_communicated(self) -> tuple[int, int]:
        """The bytes this rank has sent to and received from other ranks in ``step()`` so far
        (all-gathered updates under DDP, gradient and update pieces under FSDP2)."""
        return self._distributor.bytes_sent, self._distributor.bytes_received

    def _param_state(self, param_index: int) -> ParamState:
        """A fresh dict holding the owned blocks' state (the live tensors) and, for the first
        parameter of a group, the group's step."""
        group_index = self._group_of[param_index]
        state: ParamState = {}
        if self._group_firsts[group_index] == param_index:
            state[STEP] = self._group_steps[group_index]
        for position in self._layouts[param_index].block_positions:
            block_state = self._block_states.get(position)
            if block_state is not None:
                state[block_key(self._blocks[position].block_index)] = block_state.state_dict(keep_vars=True)
        return state

    def add_param_group(self, param_group: dict[str, object]) -> None:
        """Adds a parameter group; only possible during construction.

        Raises:
            RuntimeError: After construction: the block list and its ownership are fixed then.
            ValueError: The group has no parameters.
        """
        if hasattr(self, "_distributor"):
            raise RuntimeError("DistributedShampoo: parameter groups cannot be added after construction")
        super().add_param_group(param_group)
        if not self.param_groups[-1]["params"]:
            raise ValueError("DistributedShampoo: a parameter group has no parameters (its step count would have no home)")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one optimisation step (see the class docstring).

        Args:
            closure: Re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None.

        Raises:
            ValueError: An invalid hyperparameter was set in a parameter group.
            RuntimeError: A gradient is sparse, or momentum or ``betas[0]`` was changed from zero
                after construction (their buffers do not exist).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Everything is validated before any state changes.
        hyperparameters = self._per_param(self._validated_groups(self.param_groups))
        for param_index, param in enumerate(self._params):
            if param.grad is not None and param.grad.is_sparse:
                raise RuntimeError(f"DistributedShampoo: parameter #{param_index} has a sparse gradient")
        stepped = [param.grad is not None for param in self._params]
        self._distributor.agree_on_gradients(stepped)
        for group_step in self._group_steps:
            group_step.add_(1)
        local_params = [local_data(param) for param in self._params]
        # Per stepped parameter, this rank's gradient (with an L2 term unless decoupled) and, for
        # decoupled weight decay, the parameter: what the blocks' owners need.
        inputs: list[tuple[torch.Tensor, ...] | None] = []
        for param, local_param, group in zip(self._params, local_params, hyperparameters):
            grad = param.grad
            if grad is None:
                inputs.append(None)
                continue
            local_grad = local_data(grad)
            if group.weight_decay == 0.0:
                inputs.append((local_grad,))
            elif group.use_decoupled_weight_decay:
                inputs.append((local_grad, local_param))
            else:
                inputs.append((local_grad.add(local_param, alpha=group.weight_decay),))
        directions: dict[int, torch.Tensor] = {}
        for position, block_inputs in self._distributor.block_inputs(inputs).items():
            param_index = self._blocks[position].param_index
            dtype = self._params[param_index].dtype
            directions[position] = self._block_step(
                self._block_states[position],
                block_inputs[0].to(torch.promote_types(dtype, torch.float32)),
                block_inputs[1].to(dtype) if len(block_inputs) > 1 else None,
                hyperparameters[param_index],
                int(self._group_steps[self._group_of[param_index]]),
                *self._configs_of(param_index),
            )
        self._distributor.apply_updates(local_params, directions, stepped, [group.lr for group in hyperparameters])
        return loss

    def _block_direction(
        self,
        state: BlockState,
        grad: torch.Tensor,
        param: torch.Tensor | None,
        hyperparameters: ShampooHyperparameters,
        step: int,
        grafting: Grafting | None,
        preconditioner_config: PreconditionerConfig,
    ) -> torch.Tensor:
        """Steps 2-6 of the class docstring for one block; returns ``D`` (``W -= lr * D``).

        ``param`` is the block of the parameter, given when decoupled weight decay needs it;
        ``grafting`` and ``preconditioner_config`` are its group's.
        """
        beta1, beta2 = hyperparameters.beta1, hyperparameters.beta2
        shampoo = state.shampoo
        use_bias_correction2 = hyperparameters.use_bias_correction and beta2 < 1.0
        bias_correction2 = 1.0 - beta2**step if use_bias_correction2 else 1.0
        if shampoo is not None:
            shampoo.update(grad, beta2, hyperparameters.epsilon, bias_correction2, hyperparameters.computes_roots_at(step))
        if grafting is not None:
            grafting.update(state.adagrad, grad)

        filtered = grad
        if beta1 != 0.0:
            filtered_grad = _buffer(state.filtered_grad, "betas[0]")
            beta3 = hyperparameters.current_gradient_beta
            # With beta3 != beta1 this step uses its own average of the gradient (e.g. NAdam-like).
            current = filtered_grad.lerp(grad.to(filtered_grad.dtype), 1.0 - beta3) if beta3 != beta1 else filtered_grad
            filtered_grad.lerp_(grad.to(filtered_grad.dtype), 1.0 - beta1)
            bias_correction1 = 1.0 - beta3 * beta1 ** (step - 1) if hyperparameters.use_bias_correction else 1.0
            filtered = current.to(grad.dtype) / bias_correction1

        grafted = grafting.direction(state.adagrad, filtered, step) if grafting is not None else None
        if step >= hyperparameters.first_preconditioned_step:
            direction = (
                shampoo.precondition(filtered, hyperparameters.epsilon, bias_correction2)
                if shampoo is not None
                else descent_direction(filtered, preconditioner_config)
            )
            if grafted is not None:
                # As the reference: the grafting norm over the Shampoo norm plus 1e-16.
                scale = torch.linalg.vector_norm(grafted) / (torch.linalg.vector_norm(direction) + 1e-16)
                direction = direction * scale
        else:
            direction = grafted if grafted is not None else filtered

        if param is not None:
            direction = direction.add(param, alpha=hyperparameters.weight_decay)
        if hyperparameters.momentum != 0.0:
            momentum = _buffer(state.momentum, "momentum")
            momentum.mul_(hyperparameters.momentum).add_(direction, alpha=1.0 - hyperparameters.dampening)
            direction = (
                direction.mul(1.0 - hyperparameters.dampening).add_(momentum, alpha=hyperparameters.momentum)
                if hyperparameters.use_nesterov
                else momentum
            )
        return direction

    def _named_params(self, key_to_param: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """The name of each of the optimizer's parameters, in order.

        Raises:
            ValueError: A parameter of the optimizer has no name in ``key_to_param``.
        """
        names: dict[int, str] = {}
        for name, param in key_to_param:
            names.setdefault(id(param), name)
        missing = [index for index, param in enumerate(self._params) if id(param) not in names]
        if missing:
            raise ValueError(
                f"key_to_param names none of the optimizer's parameters #{missing}; pass model.named_parameters() "
                "of the model whose parameters the optimizer was built with"
            )
        return [names[id(param)] for param in self._params]

    def distributed_state_dict(
        self,
        key_to_param: Iterable[tuple[str, torch.Tensor]],
        save_param_groups: bool = True,
        *,
        layout: StateDictLayout = "reference",
    ) -> dict[str, object]:
        """Returns this rank's state keyed by parameter name, independent of the world size, in
        the reference implementation's structure.

        ``{"state": {name: {'["step"]': t, '["block_<i>", "shampoo", "factor_matrices", 0]': ..,
        '["block_<i>", "momentum"]': .., ...}}, "param_groups": {"<names>": {hyperparameter: value,
        "grafting_config": .., "distributed_config": .., "preconditioner_config": ..}}}``: each
        parameter's state flattened to JSON-list keys (``utils.flatten``), holding only the blocks
        this rank owns (``i`` is the block's index within its parameter); ``step``, the group's
        step count, is in the state of each group's first parameter only; a group's entry is keyed
        by its parameters' names, sorted and joined by "/". ``save_checkpoint`` stores a flattened
        mapping as the nesting it spells, so both layouts save the same checkpoint. The tensors are
        the optimizer's own (no copies): ``save_checkpoint`` writes them, and ``load_checkpoint``
        can fill them in place.

        Args:
            key_to_param: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
            save_param_groups: Include the parameter groups.
            layout: ``"reference"``, or ``"nested"``: the layout of this package's earlier
                versions, the template that loads their checkpoints' ``param_groups`` (each
                parameter's state nested, ``param_groups`` keyed by parameter name, holding the
                hyperparameters only).

        Raises:
            ValueError: A parameter of the optimizer has no name in ``key_to_param``, or an
                unknown ``layout``.
        """
        if layout not in ("reference", "nested"):
            raise ValueError(f"distributed_state_dict: layout must be 'reference' or 'nested', got {layout!r}")
        names = self._named_params(key_to_param)
        states = [self._param_state(index) for index in range(len(names))]
        result: dict[str, object] = {
            "state": dict(zip(names, states)) if layout == "nested" else {name: flatten(state) for name, state in zip(names, states)}
        }
        if save_param_groups and layout == "nested":
            groups = [group for group in self.param_groups for _ in group["params"]]  # each parameter's group
            result["param_groups"] = {
                name: {hyperparameter: group[hyperparameter] for hyperparameter in HYPERPARAMETERS}
                for name, group in zip(names, groups)
            }
        elif save_param_groups:
            result["param_groups"] = {
                self._group_key(names, index): {key: group[key] for key in HYPERPARAMETERS + _GROUP_CONFIGS}
                for index, group in enumerate(self.param_groups)
            }
        return result

    def _group_key(self, names: list[str], group_index: int) -> str:
        """The reference's key of a parameter group: its parameters' names, sorted, joined by "/"."""
        return "/".join(sorted(name for name, group in zip(names, self._group_of) if group == group_index))

    def load_distributed_state_dict(
        self,
        state_dict: Mapping[str, object],
        key_to_param: Iterable[tuple[str, torch.Tensor]],
        save_param_groups: bool = True,
        enable_missing_key_check: bool = True,
    ) -> None:
        """Loads a ``distributed_state_dict``, copying into the optimizer's tensors in place.

        State of blocks this rank does not own is ignored, so a state dict saved at any world size
        (or a full single-process one) loads at any other.

        Takes both layouts of ``distributed_state_dict`` (so also the reference implementation's
        own state dicts), each parameter's state flattened or nested. Of a group, only the
        hyperparameters are read, not its configs: this optimizer's are those it was built with,
        whose shapes its state already has.

        Args:
            state_dict: What ``distributed_state_dict`` returned, e.g. filled by ``load_checkpoint``.
            key_to_param: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
            save_param_groups: Also restore the hyperparameters from ``state_dict["param_groups"]``.
            enable_missing_key_check: Raise if state this rank needs is missing; when false, such
                state keeps its current value.

        Raises:
            KeyError: Missing state (with the check on) or missing ``param_groups``; names the key.
            ValueError: A parameter has no name, a tensor's shape differs, or a loaded
                hyperparameter is invalid or changes ``max_preconditioner_dim``.
        """
        names = self._named_params(key_to_param)
        if save_param_groups:
            saved_groups = _mapping(state_dict, "param_groups")
            self._load_hyperparameters([self._saved_group(saved_groups, names, index) for index in range(len(self.param_groups))])
        state = _mapping(state_dict, "state")
        for index, name in enumerate(names):
            if name not in state:
                if enable_missing_key_check:
                    raise KeyError(f"load_distributed_state_dict: no state for parameter {name!r}")
                continue
            saved = _mapping(state, name)
            if flattened_paths(saved) is not None:  # the reference's layout: JSON-list keys, as the checkpoint layer reads them
                saved = cast(Mapping[Key, object], unflatten(cast(Mapping[str, object], saved)))
            update_param_state_dict_object(self._param_state(index), saved, enable_missing_key_check)

    def _saved_group(self, saved_groups: Mapping[Key, object], names: list[str], group_index: int) -> tuple[str, Mapping[Key, object]]:
        """A group's saved hyperparameters and a label for messages: under the reference's group
        key (``_group_key``), or under its first parameter's name (the ``"nested"`` layout).

        Raises:
            KeyError: Neither is saved.
        """
        group_key = self._group_key(names, group_index)
        if group_key in saved_groups:
            return repr(group_key), _mapping(saved_groups, group_key)
        first = names[self._group_firsts[group_index]]
        return repr(first), _mapping(saved_groups, first)

    def _load_hyperparameters(self, saved_per_group: list[tuple[str, Mapping[Key, object]]]) -> None:
        """Validates every group's saved hyperparameters, then sets them (all or nothing).

        Args:
            saved_per_group: For each parameter group, a label for messages and its saved values.
        """
        updates: list[tuple[dict[str, object], dict[str, object]]] = []
        for group, pseudo_inverse, (label, saved) in zip(self.param_groups, self._group_pseudo_inverse, saved_per_group):
            loaded = {**group, **{key: saved[key] for key in HYPERPARAMETERS if key in saved}}
            new = ShampooHyperparameters.from_group(loaded, pseudo_inverse)
            if new.max_preconditioner_dim != group["max_preconditioner_dim"]:
                raise ValueError(
                    f"max_preconditioner_dim {new.max_preconditioner_dim} of {label} differs from the "
                    f"optimizer's {group['max_preconditioner_dim']}; the blocks would not match"
                )
            updates.append((group, loaded))
        for group, loaded in updates:
            group.update(loaded)

    def load_state_dict(self, state_dict: Mapping[str, object]) -> None:
        """Loads a ``state_dict()`` of an optimizer over the same parameters, in place.

        Unlike the base class, tensors are copied into the existing state, keeping the stored
        dtypes (e.g. bfloat16 factors) and the block ownership.

        Raises:
            ValueError: The groups or their sizes differ, or a hyperparameter is invalid.
            KeyError: A parameter's state is missing.
        """
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            raise ValueError("load_state_dict: the state dict has a different number of parameter groups")
        if any(len(saved["params"]) != len(group["params"]) for group, saved in zip(self.param_groups, saved_groups)):
            raise ValueError("load_state_dict: a parameter group has a different number of parameters")
        self._load_hyperparameters([(f"parameter group {index}", saved) for index, saved in enumerate(saved_groups)])
        saved_state = _mapping(state_dict, "state")
        ids: list[Key] = [param_id for saved in saved_groups for param_id in saved["params"]]
        for index, param_id in enumerate(ids):
            if param_id not in saved_state:
                raise KeyError(f"load_state_dict: no state for parameter #{index}")
            update_param_state_dict_object(self._param_state(index), _mapping(saved_state, param_id))


def _buffer(tensor: torch.Tensor | None, hyperparameter: str) -> torch.Tensor:
    if tensor is None:
        raise RuntimeError(
            f"DistributedShampoo: {hyperparameter} was zero at construction, so its buffer does not exist; "
            "build a new optimizer to turn it on"
        )
    return tensor


def _mapping(container: Mapping[_K, object], key: _K) -> Mapping[Key, object]:
    """``container[key]``, which must be a dict.

    Raises:
        KeyError: ``key`` is missing.
        ValueError: The value is not a dict.
    """
    if key not in container:
        raise KeyError(f"missing key {key!r}")
    value = container[key]
    if not isinstance(value, Mapping):
        raise ValueError(f"{key!r} must be a dict, got {type(value).__name__}")
    return value
