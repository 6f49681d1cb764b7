# pyre-strict
"""Config dataclasses and dtypes as checkpoint values: typed JSON, never pickled, hostile input refused."""

import math

import torch
from parameterized import parameterized

from distributed_shampoo.checkpoint import (
    CorruptCheckpointError,
    load_checkpoint,
    read_checkpoint_index,
    save_checkpoint,
    TemplateMismatchError,
    verify_checkpoint,
)
from distributed_shampoo.shampoo_types import (
    AdaGradPreconditionerConfig,
    AdamGraftingConfig,
    AdamPreconditionerConfig,
    DDPDistributedConfig,
    FullyShardDistributedConfig,
    RMSpropPreconditionerConfig,
    SGDPreconditionerConfig,
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
    "fsdp": FullyShardDistributedConfig(),
}


def _nested(depth: int) -> dict[str, object]:
    """A config whose first field holds a config, ``depth`` times over."""
    value: dict[str, object] = {"config": "SGDPreconditionerConfig", "fields": {}}
    for _ in range(depth):
        value = {"config": "AdamPreconditionerConfig", "fields": {"beta2": value, "epsilon": 1e-8}}
    return value


def _objects(document: Document) -> dict[str, object]:
    objects = document["metadata"]["objects"]
    assert isinstance(objects, dict)
    return objects


class ConfigValuesTest(ScratchDirTest):
    def _state(self) -> dict[str | int, object]:
        return {
            "param_groups": [{"lr": 0.1, "grafting_config": config} for config in _CONFIGS.values()],
            "dtype": torch.float16,
            "inf": -math.inf,
            "w": torch.arange(3.0),
        }

    def test_round_trip_without_a_template(self) -> None:
        save_checkpoint(self.root / "ckpt", self._state())
        loaded = load_checkpoint(self.root / "ckpt")
        self.assertEqual([group["grafting_config"] for group in loaded["param_groups"]], list(_CONFIGS.values()))  # pyre-ignore[16]
        self.assertIs(loaded["dtype"], torch.float16)
        self.assertEqual(loaded["inf"], -math.inf)
        verify_checkpoint(self.root / "ckpt")

    def test_the_index_holds_typed_json(self) -> None:
        save_checkpoint(self.root / "ckpt", self._state())
        objects = _objects(read_document(self.root / "ckpt"))
        self.assertEqual(
            objects['["param_groups", 5, "grafting_config"]'],
            {"config": "DDPDistributedConfig", "fields": {
                "num_trainers_per_group": 2, "communication_dtype": {"dtype": "bfloat16"}, "target_parameter_dimensionality": 1,
            }},
        )
        self.assertEqual(objects['["dtype"]'], {"dtype": "float16"})

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

    def test_another_config_type_does_not_fit_the_template(self) -> None:
        save_checkpoint(self.root / "ckpt", {"grafting": AdamPreconditionerConfig()})
        with self.assertRaisesRegex(TemplateMismatchError, r'\["grafting"\]: saved AdamPreconditionerConfig .* cannot become the template\'s AdaGradPreconditionerConfig'):
            load_checkpoint(self.root / "ckpt", {"grafting": AdaGradPreconditionerConfig()})

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
            ("nested_too_deep", _nested(10), r"configs nested deeper than 8"),
        ]
    )
    def test_hostile_values_are_corrupt_checkpoints_naming_file_and_key(self, _name: str, value: object, message: str) -> None:
        save_checkpoint(self.root / "ckpt", {"grafting": AdamPreconditionerConfig(), "w": torch.ones(2)})
        edit_index(lambda document: _objects(document).update({'["grafting"]': value}))(self.root / "ckpt")
        for read in (read_checkpoint_index, load_checkpoint):
            with self.assertRaisesRegex(CorruptCheckpointError, rf'optimizer.safetensors.index.json: "objects" \["grafting"\]: .*{message}'):
                read(self.root / "ckpt")
