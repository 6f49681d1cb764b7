# pyre-strict
"""Config dataclasses and dtypes as checkpoint values: typed JSON, never pickled, hostile input refused."""

import math

import torch
from parameterized import parameterized

from distributed_shampoo.checkpoint import (
    CorruptCheckpointError,
    UnsupportedValueError,
    load_checkpoint,
    read_checkpoint_index,
    save_checkpoint,
    TemplateMismatchError,
    verify_checkpoint,
)
from distributed_shampoo.preconditioner.matrix_functions_types import (
    CoupledHigherOrderConfig,
    CoupledNewtonConfig,
    EigenConfig,
    EighEigendecompositionConfig,
    NewtonSchulzOrthogonalizationConfig,
    PseudoInverseConfig,
    QREigendecompositionConfig,
    SVDOrthogonalizationConfig,
)
from distributed_shampoo.shampoo_types import (
    AdaGradPreconditionerConfig,
    AdamGraftingConfig,
    AdamPreconditionerConfig,
    DDPDistributedConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    FSDPParamAssignmentStrategy,
    FullyShardDistributedConfig,
    HybridShardDistributedConfig,
    RMSpropPreconditionerConfig,
    RootInvShampooPreconditionerConfig,
    SGDPreconditionerConfig,
    SignDescentPreconditionerConfig,
    SpectralDescentPreconditionerConfig,
)
from tests.checkpoint.scratch import ScratchDirTest
from tests.checkpoint.tamper import add_loader_files, Document, edit_index, read_document

_CONFIGS: dict[str, object] = {
    "sgd": SGDPreconditionerConfig(),
    "adagrad": AdaGradPreconditionerConfig(epsilon=1e-3),
    "rmsprop": RMSpropPreconditionerConfig(beta2=0.95, epsilon=1e-6),
    "adam": AdamPreconditionerConfig(beta2=0.9),
    "adam, the reference's name": AdamGraftingConfig(beta2=0.95),
    "ddp": DDPDistributedConfig(num_trainers_per_group=2, communication_dtype=torch.bfloat16),
    "fsdp": FullyShardDistributedConfig(param_assignment_strategy=FSDPParamAssignmentStrategy.ROUND_ROBIN),
    "hsdp": HybridShardDistributedConfig(num_trainers_per_group=2, communicate_params=True),
    # Mapping fields keep their int keys; a tuple field comes back a tuple.
    "root inverse, exponent overrides": RootInvShampooPreconditionerConfig(
        inverse_exponent_override={1: 0.5, 2: {0: 0.0, 1: 0.25}}, inv_factor_matrix_dtype=torch.float64,
        amortized_computation_config=EigenConfig(retry_double_precision=False),
    ),
    "coupled newton": RootInvShampooPreconditionerConfig(amortized_computation_config=CoupledNewtonConfig(max_iterations=50)),
    "coupled higher order": RootInvShampooPreconditionerConfig(
        amortized_computation_config=CoupledHigherOrderConfig(rel_epsilon=1e-6, abs_epsilon=0.0, order=4),
    ),
    "eigendecomposed": EigendecomposedShampooPreconditionerConfig(factor_matrix_dtype=torch.float64),
    "pseudo-inverse": EigendecomposedShampooPreconditionerConfig(
        amortized_computation_config=EighEigendecompositionConfig(rank_deficient_stability_config=PseudoInverseConfig(rank_rtol=None)),
    ),
    "soap": EigenvalueCorrectedShampooPreconditionerConfig(
        amortized_computation_config=QREigendecompositionConfig(), ignored_basis_change_dims={2: [0]}, inverse_exponent_override={2: math.inf},
    ),
    "sign descent": SignDescentPreconditionerConfig(),
    "spectral descent": SpectralDescentPreconditionerConfig(
        orthogonalization_config=NewtonSchulzOrthogonalizationConfig(num_iterations=3, coefficients=(2.0, -1.5, 0.5)),
    ),
    "spectral descent, svd": SpectralDescentPreconditionerConfig(orthogonalization_config=SVDOrthogonalizationConfig(scale_by_nuclear_norm=True)),
}


def _nested(depth: int) -> dict[str, object]:
    """A config whose first field holds a config, ``depth`` times over."""
    value: dict[str, object] = {"config": "SGDPreconditionerConfig", "fields": {}}
    for _ in range(depth):
        value = {"config": "AdamPreconditionerConfig", "fields": {"beta2": value, "epsilon": 1e-8}}
    return value


def _soap(ignored_basis_change_dims: object) -> dict[str, object]:
    """A SOAP config's typed JSON with ``ignored_basis_change_dims`` as given (its other fields default)."""
    return {"config": "EigenvalueCorrectedShampooPreconditionerConfig", "fields": {"ignored_basis_change_dims": ignored_basis_change_dims}}


def _objects(document: Document) -> dict[str, object]:
    objects = document["metadata"]["objects"]
    assert isinstance(objects, dict)
    return objects


class ConfigValuesTest(ScratchDirTest):
    def _state(self) -> dict[str | int, object]:
        return {
            "param_groups": [{"lr": 0.1, "grafting_config": config} for config in _CONFIGS.values()],
            "dtype": torch.float16,
            "strategy": FSDPParamAssignmentStrategy.REPLICATE,
            "inf": -math.inf,
            "w": torch.arange(3.0),
        }

    def test_round_trip_without_a_template(self) -> None:
        save_checkpoint(self.root / "ckpt", self._state())
        loaded = load_checkpoint(self.root / "ckpt")
        self.assertEqual([group["grafting_config"] for group in loaded["param_groups"]], list(_CONFIGS.values()))  # pyre-ignore[16]
        self.assertIs(loaded["dtype"], torch.float16)
        self.assertIs(loaded["strategy"], FSDPParamAssignmentStrategy.REPLICATE)
        self.assertEqual(loaded["inf"], -math.inf)
        verify_checkpoint(self.root / "ckpt")

    def test_the_index_holds_typed_json(self) -> None:
        save_checkpoint(self.root / "ckpt", self._state())
        objects = _objects(read_document(self.root / "ckpt"))
        self.assertEqual(
            objects['["param_groups", 5, "grafting_config"]'],
            {"config": "DDPDistributedConfig", "fields": {
                "num_trainers_per_group": 2, "communication_dtype": {"dtype": "bfloat16"}, "communicate_params": False,
                "target_parameter_dimensionality": 1,
            }},
        )
        self.assertEqual(objects['["dtype"]'], {"dtype": "float16"})
        self.assertEqual(objects['["strategy"]'], {"enum": "FSDPParamAssignmentStrategy", "name": "REPLICATE"})

    @parameterized.expand([("from_the_index", False), ("from_the_loader_files", True)])
    def test_template_receives_the_saved_configs(self, _name: str, loader_files: bool) -> None:
        save_checkpoint(self.root / "ckpt", self._state())
        if loader_files:  # a template load then reads the values from the manifest
            add_loader_files(self.root / "ckpt")
        template = self._state()
        template["param_groups"] = [{"lr": 0.0, "grafting_config": type(config)()} for config in _CONFIGS.values()]
        template["dtype"] = torch.float32
        load_checkpoint(self.root / "ckpt", template)
        self.assertEqual([group["grafting_config"] for group in template["param_groups"]], list(_CONFIGS.values()))  # pyre-ignore[16]
        self.assertIs(template["dtype"], torch.float16)

    def test_a_config_written_before_a_field_was_added_takes_its_default(self) -> None:
        # The previous version's DDPDistributedConfig had no target_parameter_dimensionality.
        save_checkpoint(self.root / "ckpt", {"config": DDPDistributedConfig(num_trainers_per_group=2)})
        old = {"config": "DDPDistributedConfig", "fields": {"num_trainers_per_group": 2, "communication_dtype": {"dtype": "float32"}}}
        edit_index(lambda document: _objects(document).update({'["config"]': old}))(self.root / "ckpt")
        self.assertEqual(load_checkpoint(self.root / "ckpt")["config"], DDPDistributedConfig(num_trainers_per_group=2, target_parameter_dimensionality=1))

    def test_the_index_holds_mappings_as_pairs_and_no_default_function(self) -> None:
        save_checkpoint(self.root / "ckpt", {"soap": _CONFIGS["soap"], "sign": SignDescentPreconditionerConfig()})
        objects = _objects(read_document(self.root / "ckpt"))
        fields = objects['["soap"]']["fields"]  # pyre-ignore[16]
        self.assertEqual(fields["ignored_basis_change_dims"], {"mapping": [[2, [0]]]})
        self.assertEqual(fields["inverse_exponent_override"], {"mapping": [[2, {"float": "inf"}]]})
        self.assertEqual(objects['["sign"]'], {"config": "SignDescentPreconditionerConfig", "fields": {}})
        # A live device mesh is not saved: it reads back as None.
        save_checkpoint(self.root / "hsdp", {"hsdp": HybridShardDistributedConfig()})
        self.assertNotIn("device_mesh", _objects(read_document(self.root / "hsdp"))['["hsdp"]']["fields"])
        self.assertIsNone(load_checkpoint(self.root / "hsdp")["hsdp"].device_mesh)  # pyre-ignore[16]

    def test_a_function_other_than_the_default_is_refused_naming_key_and_field(self) -> None:
        state = {"param_groups": {"w": {"preconditioner_config": SignDescentPreconditionerConfig(scale_fn=lambda m: 2.0)}}}
        with self.assertRaisesRegex(
            UnsupportedValueError,
            r'^\["param_groups", "w", "preconditioner_config"\]: SignDescentPreconditionerConfig.scale_fn holds the function '
            r"'ConfigValuesTest.test_a_function_other_than_the_default_is_refused_naming_key_and_field.<locals>.<lambda>': "
            r"a checkpoint holds no code",
        ):
            save_checkpoint(self.root / "ckpt", state)
        self.assertFalse((self.root / "ckpt").exists())

    def test_a_config_of_the_templates_kind_fills_it(self) -> None:
        # A resume that changes the distribution (DDP to FSDP2) or the grafting class loads the saved config.
        save_checkpoint(self.root / "ckpt", {"grafting": AdamPreconditionerConfig(), "distributed": DDPDistributedConfig()})
        template: dict[str, object] = {"grafting": AdaGradPreconditionerConfig(), "distributed": FullyShardDistributedConfig()}
        load_checkpoint(self.root / "ckpt", template)
        self.assertEqual(template, {"grafting": AdamPreconditionerConfig(), "distributed": DDPDistributedConfig()})

    def test_a_config_of_another_kind_does_not_fit_the_template(self) -> None:
        save_checkpoint(self.root / "ckpt", {"grafting": AdamPreconditionerConfig()})
        with self.assertRaisesRegex(TemplateMismatchError, r'\["grafting"\]: saved AdamPreconditionerConfig .* cannot become the template\'s DDPDistributedConfig'):
            load_checkpoint(self.root / "ckpt", {"grafting": DDPDistributedConfig()})

    @parameterized.expand(
        [
            ("unknown_type", {"config": "os.system", "fields": {}}, r"unknown config type 'os.system'"),
            ("unknown_field", {"config": "AdamPreconditionerConfig", "fields": {"beta2": 0.9, "epsilon": 1e-8, "gamma": 1}},
             r"AdamPreconditionerConfig has the fields \['beta2', 'epsilon'\], got \['beta2', 'epsilon', 'gamma'\]"),
            ("field_of_the_wrong_type", {"config": "DDPDistributedConfig", "fields": {"num_trainers_per_group": 1.5, "communication_dtype": {"dtype": "float32"}}},
             r"DDPDistributedConfig.num_trainers_per_group: expected <class 'int'>, got 1.5"),
            ("refused_by_the_class", {"config": "AdaGradPreconditionerConfig", "fields": {"epsilon": -1.0}},
             r"AdaGradPreconditionerConfig refuses its saved fields: AdaGradPreconditionerConfig: epsilon must be > 0, got -1.0"),
            ("unknown_dtype", {"dtype": "Tensor"}, r'expected a JSON scalar, \{"float": ...\}, \{"dtype": ...\}'),
            ("unknown_enum_member", {"enum": "FSDPParamAssignmentStrategy", "name": "__class__"}, r"unknown enum member FSDPParamAssignmentStrategy.__class__"),
            ("unknown_enum", {"enum": "os.system", "name": "DEFAULT"}, r"unknown enum member os.system.DEFAULT \(this library reads \['FSDPParamAssignmentStrategy'\]\)"),
            ("nested_too_deep", _nested(10), r"configs nested deeper than 8"),
            ("mapping_not_pairs", _soap({"mapping": [[2]]}), r'EigenvalueCorrectedShampooPreconditionerConfig\.ignored_basis_change_dims: expected \{"mapping": \[\[key, value\], \.\.\.\]\}'),
            ("mapping_key_twice", _soap({"mapping": [[2, [0]], [2, [1]]]}), r"EigenvalueCorrectedShampooPreconditionerConfig\.ignored_basis_change_dims: the mapping key 2 appears twice"),
            ("mapping_key_of_the_wrong_type", _soap({"mapping": [["2", [0]]]}), r"EigenvalueCorrectedShampooPreconditionerConfig\.ignored_basis_change_dims: expected .*Mapping\[int, .*got \{'2': \[0\]\}"),
            ("list_where_a_mapping_belongs", _soap([2, 0]), r"EigenvalueCorrectedShampooPreconditionerConfig\.ignored_basis_change_dims: expected .*got \[2, 0\]"),
            ("list_at_the_top", [1, 2], r"expected a JSON scalar or a typed value, got list"),
            ("function_field_in_the_file", {"config": "SignDescentPreconditionerConfig", "fields": {"scale_fn": "os.system"}},
             r"SignDescentPreconditionerConfig\.scale_fn: expected .*Callable.*, got 'os.system'"),
            ("tuple_of_the_wrong_length", {"config": "NewtonSchulzOrthogonalizationConfig", "fields": {"coefficients": [1.0, 2.0]}},
             r"NewtonSchulzOrthogonalizationConfig\.coefficients: expected tuple\[float, float, float\], got \[1.0, 2.0\]"),
        ]
    )
    def test_hostile_values_are_corrupt_checkpoints_naming_file_and_key(self, _name: str, value: object, message: str) -> None:
        save_checkpoint(self.root / "ckpt", {"grafting": AdamPreconditionerConfig(), "w": torch.ones(2)})
        edit_index(lambda document: _objects(document).update({'["grafting"]': value}))(self.root / "ckpt")
        for read in (read_checkpoint_index, load_checkpoint):
            with self.assertRaisesRegex(CorruptCheckpointError, rf'optimizer.safetensors.index.json: "objects" \["grafting"\]: .*{message}'):
                read(self.root / "ckpt")
