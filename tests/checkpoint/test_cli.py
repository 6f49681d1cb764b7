# pyre-strict
"""The command-line tool on a real 4-rank DistributedShampoo checkpoint."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import torch
from safetensors import safe_open

from distributed_shampoo.checkpoint import load_checkpoint, read_checkpoint_index, save_checkpoint
from distributed_shampoo.checkpoint import InvalidArgumentError
from distributed_shampoo.checkpoint.cli import main
from distributed_shampoo.checkpoint.offline import rewrite_checkpoint
from distributed_shampoo.checkpoint.plan import named_leaves
from distributed_shampoo.launch import run_on_ranks
from distributed_shampoo.utils.shampoo_checkpoint_utils import encode_key, flatten, Key
from tests.checkpoint.faults import flip_last_byte
from tests.checkpoint.test_trust import _equal
from tests.test_distributed_training import _model, _optimizer, Run, train


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Runs the tool in this process; returns (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def _check_ownership(rank: int, world_size: int, directory: str) -> None:
    """Every block this rank's optimizer owns is in this rank's file of the resharded checkpoint."""
    model = _model()
    optimizer = _optimizer(model, Run(world_size, ""))
    state: dict[Key, object] = {"optimizer": optimizer.distributed_state_dict(model.named_parameters())}
    owned = [name for name, _ in named_leaves(state) if "block_" in name]
    assert owned, "this rank owns no block"
    weight_map = read_checkpoint_index(directory).weight_map
    own_file = f"optimizer-{rank + 1:05d}-of-{world_size:05d}.safetensors"
    elsewhere = [name for name in owned if weight_map[name] != own_file]
    assert not elsewhere, f"rank {rank}: {elsewhere[:3]} are not in {own_file}"
    in_file = {name for name, file in weight_map.items() if file == own_file and "block_" in name}
    assert in_file == set(owned), f"rank {rank}: the file holds blocks of other ranks: {sorted(in_file - set(owned))[:3]}"


class CliTest(unittest.TestCase):
    tmp: tempfile.TemporaryDirectory[str]
    checkpoint: Path

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.TemporaryDirectory()
        cls.checkpoint = Path(cls.tmp.name, "ckpt4")
        run_on_ranks(4, train, Run(4, str(Path(cls.tmp.name, "out")), save_dir=str(cls.checkpoint)))

    @classmethod
    def tearDownClass(cls) -> None:
        cls.tmp.cleanup()

    def path(self, name: str) -> Path:
        return Path(self.tmp.name, f"{self._testMethodName}-{name}")

    def damaged_copy(self) -> Path:
        copy = self.path("damaged")
        shutil.copytree(self.checkpoint, copy)
        return copy

    def test_inspect_json(self) -> None:
        status, out, err = run_cli("inspect", str(self.checkpoint), "--json")
        self.assertEqual((status, err), (0, ""))
        summary = json.loads(out)
        index = read_checkpoint_index(self.checkpoint)
        self.assertEqual((summary["world_size"], summary["format_version"], summary["total_size"]), (4, 3, index.total_size))
        self.assertEqual([f["rank"] for f in summary["files"].values()], [0, 1, 2, 3])
        self.assertEqual(sum(f["tensors"] for f in summary["files"].values()), len(index.weight_map))
        self.assertEqual(sum(f["bytes"] for f in summary["files"].values()), index.total_size)
        self.assertTrue(all(f["tensors"] > 0 for f in summary["files"].values()))
        self.assertEqual(sum(p["bytes"] for p in summary["parameters"].values()), index.total_size)
        self.assertIn("optimizer/state/3.weight", summary["parameters"])
        self.assertEqual(set(summary["dtypes"]), {"F32", "I64"})

    def test_inspect_text(self) -> None:
        status, out, _ = run_cli("inspect", str(self.checkpoint))
        self.assertEqual(status, 0)
        lines = out.splitlines()
        self.assertEqual(lines[0], f"checkpoint {self.checkpoint}")
        self.assertTrue(lines[1].startswith("format version 3, saved by 4 ranks, "), lines[1])
        self.assertIn("| 3 | optimizer-00004-of-00004.safetensors |", out)
        self.assertIn("| optimizer/state/0.weight |", out)

    def test_verify_ok(self) -> None:
        status, out, err = run_cli("verify", str(self.checkpoint))
        self.assertEqual(status, 0)
        self.assertRegex(out, r"^OK: .*ckpt4: 4 files, \d+ stored tensors, .*, every checksum matches\n$")
        self.assertIn("verify: files: 4/4", err)

    def test_verify_reports_every_problem(self) -> None:
        copy = self.damaged_copy()
        flip_last_byte(copy / "optimizer-00002-of-00004.safetensors")
        truncated = copy / "optimizer-00003-of-00004.safetensors"
        truncated.write_bytes(truncated.read_bytes()[:-10])
        (copy / "optimizer-00004-of-00004.safetensors").unlink()
        status, _, err = run_cli("verify", str(copy))
        self.assertEqual(status, 1)
        report = [line for line in err.splitlines() if not line.startswith("verify:")]
        self.assertEqual(report[0], f"FAILED: {copy}: 3 problem(s)")
        self.assertEqual([line.split(":")[0].strip() for line in report[1:]], ["ChecksumMismatchError", "CorruptCheckpointError", "MissingShardFileError"])
        self.assertNotIn("Traceback", err)

    def test_missing_checkpoint_is_an_error_without_traceback(self) -> None:
        for command in ("inspect", "verify"):
            status, out, err = run_cli(command, str(self.path("nowhere")))
            self.assertEqual((status, out), (1, ""))
            self.assertIn("no checkpoint at", err)
            self.assertNotIn("Traceback", err)

    def test_consolidate(self) -> None:
        out_file = self.path("all.safetensors")
        status, out, _ = run_cli("consolidate", str(self.checkpoint), str(out_file))
        self.assertEqual(status, 0)
        self.assertEqual(out.split(" (")[0], f"wrote {out_file}")
        everything = flatten(load_checkpoint(self.checkpoint))
        with safe_open(str(out_file), framework="pt") as consolidated:
            tensors = {name: consolidated.get_tensor(name) for name in consolidated.keys()}
            header = consolidated.metadata()
        self.assertEqual(set(tensors), {name for name, value in everything.items() if isinstance(value, torch.Tensor)})
        for name, tensor in tensors.items():
            self.assertTrue(torch.equal(tensor, everything[name]), name)  # pyre-ignore[6]
        values = json.loads(header["distributed_shampoo.values"])
        self.assertEqual(values[encode_key(["optimizer", "param_groups", "0.bias/0.weight/3.bias/3.weight/5.bias/5.weight", "lr"])], 0.05)
        status, _, err = run_cli("consolidate", str(self.checkpoint), str(out_file))
        self.assertEqual(status, 1)
        self.assertEqual(err, f"error: {out_file} already exists\n")

    def test_reshard_gives_each_rank_the_blocks_the_optimizer_gives_it(self) -> None:
        for world_size in (2, 3):
            out_dir = self.path(f"ckpt{world_size}")
            status, out, _ = run_cli("reshard", str(self.checkpoint), str(out_dir), "--world-size", str(world_size))
            self.assertEqual(status, 0, out)
            self.assertEqual(out.splitlines()[0], f"wrote {out_dir} for {world_size} ranks")
            self.assertEqual(run_cli("verify", str(out_dir))[0], 0)
            self.assertEqual(run_cli("diff", str(self.checkpoint), str(out_dir))[:2], (0, f"identical: {len(read_checkpoint_index(out_dir).tensors)} tensors and every value are equal\n"))
            run_on_ranks(world_size, _check_ownership, str(out_dir))

    def test_reshard_refuses_state_without_blocks(self) -> None:
        plain = self.path("plain")
        save_checkpoint(plain, {"w": torch.ones(2)})
        status, _, err = run_cli("reshard", str(plain), str(self.path("out")), "--world-size", "2")
        self.assertEqual(status, 1)
        self.assertIn("no Shampoo blocks", err)
        self.assertFalse(self.path("out").exists())

    def test_rewrite_needs_every_tensor_exactly_once(self) -> None:
        plain = self.path("plain")
        save_checkpoint(plain, {"a": torch.ones(2), "b": torch.zeros(3), "n": 1})
        for writes, what in (([['["a"]'], []], r"missing \['\[\"b\"\]'\]"), ([['["a"]', '["b"]'], ['["a"]']], "1 repeated"),
                             ([['["a"]', '["b"]', '["c"]']], r"unknown \['\[\"c\"\]'\]"), ([], "at least one rank")):
            with self.assertRaisesRegex(InvalidArgumentError, what):
                rewrite_checkpoint(plain, self.path("out"), writes)
            self.assertFalse(self.path("out").exists())
        index = rewrite_checkpoint(plain, self.path("out"), [['["b"]'], ['["a"]']])
        self.assertEqual(index.weight_map, {'["b"]': "optimizer-00001-of-00002.safetensors", '["a"]': "optimizer-00002-of-00002.safetensors"})
        self.assertTrue(_equal(load_checkpoint(self.path("out")), {"a": torch.ones(2), "b": torch.zeros(3), "n": 1}))

    def test_diff_reports_what_differs_and_by_how_much(self) -> None:
        state = load_checkpoint(self.checkpoint)
        model_state = state["model"]
        assert isinstance(model_state, dict)
        weight = model_state["0.weight"]
        assert isinstance(weight, torch.Tensor)
        weight[0, 0, 0, 0] += 0.5
        del model_state["0.bias"]
        model_state["extra"] = torch.zeros(1)
        changed = self.path("changed")
        save_checkpoint(changed, state)
        status, out, _ = run_cli("diff", str(self.checkpoint), str(changed))
        self.assertEqual(status, 1)
        self.assertIn('only in A: ["model", "0.bias"]\n', out)
        self.assertIn('only in B: ["model", "extra"]\n', out)
        row = next(line for line in out.splitlines() if line.startswith('| ["model", "0.weight"]'))
        self.assertEqual(row.split("|")[2:5], [" values ", " 1 ", " 5.000e-01 "])
        self.assertTrue(out.splitlines()[-1].startswith("1 tensors differ, "), out)

    def test_converting_a_damaged_checkpoint_fails_and_writes_nothing(self) -> None:
        copy = self.damaged_copy()
        flip_last_byte(copy / "optimizer-00002-of-00004.safetensors")
        outputs = {"consolidate": self.path("all.safetensors"), "reshard": self.path("resharded")}
        for command, out in outputs.items():
            extra = ["--world-size", "2"] if command == "reshard" else []
            status, _, err = run_cli(command, str(copy), str(out), *extra)
            self.assertEqual(status, 1, command)
            last = err.splitlines()[-1]
            self.assertTrue(last.startswith("error: ") and "has checksum" in last and last.endswith("(corrupted data)"), err)
            self.assertNotIn("Traceback", err)
            self.assertFalse(out.exists(), command)
        self.assertEqual([p.name for p in Path(self.tmp.name).iterdir() if p.name.startswith(".")], [])
        status, out_text, err = run_cli("diff", str(self.checkpoint), str(copy))
        self.assertEqual((status, out_text), (2, ""))
        self.assertIn("(corrupted data)", err)

    def test_module_entry_point(self) -> None:
        completed = subprocess.run(
            [sys.executable, "-m", "distributed_shampoo.checkpoint", "inspect", str(self.path("missing"))],
            capture_output=True, text=True, timeout=120,
        )
        self.assertEqual(completed.returncode, 1)
        self.assertTrue(completed.stderr.startswith("error: no checkpoint at"), completed.stderr)
