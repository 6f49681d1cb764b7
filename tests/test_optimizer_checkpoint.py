# pyre-strict
"""The optimizer's own state dict through the checkpoint layer: every preconditioner config saved
with its param_groups (typed JSON), and checkpoints of the earlier, nested layout."""

import math
import warnings

import torch
from parameterized import parameterized

from distributed_shampoo import (
    AdamPreconditionerConfig,
    CoupledNewtonConfig,
    DistributedShampoo,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    PreconditionerConfig,
    QREigendecompositionConfig,
    RootInvShampooPreconditionerConfig,
    SignDescentPreconditionerConfig,
    SingleDeviceDistributedConfig,
    SpectralDescentPreconditionerConfig,
    SVDOrthogonalizationConfig,
)
from distributed_shampoo.checkpoint import load_checkpoint, MissingKeyError, save_checkpoint
from tests.checkpoint.scratch import ScratchDirTest
from tests.test_distributed_shampoo import run

_CONFIGS: list[tuple[str, PreconditionerConfig]] = [
    ("root_inverse", RootInvShampooPreconditionerConfig()),
    ("coupled_newton_exponent_override", RootInvShampooPreconditionerConfig(
        amortized_computation_config=CoupledNewtonConfig(), inverse_exponent_override={2: {0: 0.0}},
    )),
    ("eigendecomposed", EigendecomposedShampooPreconditionerConfig()),
    ("soap_qr_ignored_dims", EigenvalueCorrectedShampooPreconditionerConfig(
        amortized_computation_config=QREigendecompositionConfig(), ignored_basis_change_dims={2: [1]},
    )),
    ("sign_descent", SignDescentPreconditionerConfig()),
    ("spectral_descent_svd", SpectralDescentPreconditionerConfig(orthogonalization_config=SVDOrthogonalizationConfig())),
]
_GROUP = "0.weight/2.weight"  # the one group's key: its parameters' names, sorted


def _setup(config: PreconditionerConfig) -> tuple[torch.nn.Module, DistributedShampoo]:
    """A bias-free MLP (spectral descent takes matrices only), the same weights every time, and its optimizer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False), torch.nn.Tanh(), torch.nn.Linear(5, 3, bias=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sign and spectral descent say which hyperparameters they ignore
        optimizer = DistributedShampoo(
            # epsilon: a 5x6 weight's 6x6 factor has rank 5 after one step; with the default 1e-12
            # it is singular in float32, where coupled Newton diverges or not by the CPU's rounding.
            model.parameters(), lr=0.05, betas=(0.9, 0.95), epsilon=1e-6, momentum=0.5, max_preconditioner_dim=math.inf,
            grafting_config=AdamPreconditionerConfig(beta2=0.9), preconditioner_config=config,
            distributed_config=SingleDeviceDistributedConfig(target_parameter_dimensionality=2),
        )
    return model, optimizer


def _grads(model: torch.nn.Module, steps: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [[torch.randn(p.shape, generator=generator) for p in model.parameters()] for _ in range(steps)]


class OptimizerCheckpointTest(ScratchDirTest):
    @parameterized.expand(_CONFIGS)
    def test_the_default_state_dict_saves_with_its_configs_and_resumes_exactly(self, _name: str, config: PreconditionerConfig) -> None:
        model, optimizer = _setup(config)
        grads = _grads(model, 5)
        run(optimizer, list(model.parameters()), grads[:3])
        save_checkpoint(self.root / "ckpt", {"optimizer": optimizer.distributed_state_dict(model.named_parameters())})

        resumed_model, resumed = _setup(config)
        resumed_model.load_state_dict(model.state_dict())
        template = resumed.distributed_state_dict(resumed_model.named_parameters())
        resumed.param_groups[0]["lr"] = 7.0
        load_checkpoint(self.root / "ckpt", {"optimizer": template})
        group = template["param_groups"][_GROUP]  # pyre-ignore[16]
        self.assertEqual(group["preconditioner_config"], config)
        self.assertEqual(group["grafting_config"], AdamPreconditionerConfig(beta2=0.9))
        resumed.load_distributed_state_dict(template, resumed_model.named_parameters())
        self.assertEqual(resumed.param_groups[0]["lr"], 0.05)

        run(optimizer, list(model.parameters()), grads[3:])
        run(resumed, list(resumed_model.parameters()), grads[3:])
        for (name, value), resumed_value in zip(model.state_dict().items(), resumed_model.state_dict().values()):
            self.assertTrue(torch.equal(value, resumed_value), name)

    def _save_nested_at_step_3(self) -> tuple[dict[str, torch.Tensor], list[list[torch.Tensor]], dict[str, torch.Tensor]]:
        """Saves the earlier versions' layout after 3 of 5 steps; returns the weights then, the
        gradients, and the weights after the uninterrupted 5 steps."""
        model, optimizer = _setup(RootInvShampooPreconditionerConfig())
        grads = _grads(model, 5)
        run(optimizer, list(model.parameters()), grads[:3])
        at_save = {name: value.clone() for name, value in model.state_dict().items()}
        save_checkpoint(self.root / "ckpt", {"optimizer": optimizer.distributed_state_dict(model.named_parameters(), layout="nested")})
        run(optimizer, list(model.parameters()), grads[3:])
        return at_save, grads, model.state_dict()

    def test_a_checkpoint_of_the_earlier_layout_names_what_todays_template_lacks(self) -> None:
        self._save_nested_at_step_3()
        model, optimizer = _setup(RootInvShampooPreconditionerConfig())
        with self.assertRaisesRegex(
            MissingKeyError, r'holds no value for 18 template keys: \["optimizer", "param_groups", "0.weight/2.weight", "lr"\]'
        ):
            load_checkpoint(self.root / "ckpt", {"optimizer": optimizer.distributed_state_dict(model.named_parameters())})

    @parameterized.expand([("its_state_into_todays_template", "reference"), ("all_of_it_into_the_nested_template", "nested")])
    def test_a_checkpoint_of_the_earlier_layout_resumes_exactly(self, _name: str, layout: str) -> None:
        at_save, grads, uninterrupted = self._save_nested_at_step_3()
        model, optimizer = _setup(RootInvShampooPreconditionerConfig())
        model.load_state_dict(at_save)
        optimizer.param_groups[0]["lr"] = 7.0
        template = optimizer.distributed_state_dict(model.named_parameters(), layout=layout)  # pyre-ignore[6]
        nested = layout == "nested"
        # The state has today's names on disk; the param_groups are keyed per parameter, without configs.
        load_checkpoint(self.root / "ckpt", {"optimizer": template}, keys=None if nested else [("optimizer", "state")])
        optimizer.load_distributed_state_dict(template, model.named_parameters(), save_param_groups=nested)
        self.assertEqual(optimizer.param_groups[0]["lr"], 0.05 if nested else 7.0)
        optimizer.param_groups[0]["lr"] = 0.05
        run(optimizer, list(model.parameters()), grads[3:])
        for name, value in model.state_dict().items():
            self.assertTrue(torch.equal(value, uninterrupted[name]), name)
