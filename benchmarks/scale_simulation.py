# pyre-strict
"""The checkpoint coordination of a 70B-parameter model's Shampoo state at 8 to 1,024 ranks,
simulated in one process: metadata only, no tensor data, the real code paths.

    python -m benchmarks.scale_simulation [--world-sizes 8 64 512 1024] [--max-dims 2048 8192] \
        [--resume-at 768] [--plot docs/scale_simulation.png]

The model: 80 layers, hidden 8192, FFN 28672, vocabulary 128256, 64 query and 8 key/value heads of
dim 128 (q, k, v, o, gate, up and down projections, two norms per layer, embedding, final norm,
untied head). Its Shampoo state in fp32 with Adam grafting and ``betas=(0.9, 0.999)``: per block,
factor matrices and inverse roots per dimension, the grafting accumulator and the filtered
gradient; the parameter group's step, in its first parameter's state (which every rank holds,
as under ``DDPDistributedConfig``).
Ownership is the optimizer's own ``block_owners`` over ``block_state_nbytes``.

Per world size W, each simulated rank's state dict holds its blocks as tensors without memory of
their own (one element expanded to the block's shape), so ``plan_local`` (the real one) plans
it. Then, as in a save: the plans are pickled as ``gather_to_first`` would send them; rank 0 runs
``plan_global`` and pickles each rank's decision; each rank's written-file record (checksums and
1 MiB page checksums, made-up digests) is pickled; rank 0 runs the real ``commit_index`` into a
temporary directory (the index and the loader's files). Then the whole index is parsed
(``read_index``, every check included: what ``verify`` and the tools read), and one loading rank at
``--resume-at`` ranks (the one owning the most tensors) plans its load as ``load_checkpoint``
does: the manifest, the lookup table and the index parts its tensors are in
(``read_partial_index``), then ``LoadPlan`` (every check but the shard files' reads); memory is the
Python heap's peak during a second, traced planning (``tracemalloc``).
"""

import argparse
import importlib
import json
import math
import os
import pickle
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast, TypeVar

import torch

from distributed_shampoo.checkpoint.api import _Decision, _Prepared, commit_index, StagedSave
from distributed_shampoo.checkpoint.commit import new_save_id, staging_dir
from distributed_shampoo.checkpoint.format import FileRecord, PAGE_BYTES
from distributed_shampoo.checkpoint.index_parts import read_partial_index
from distributed_shampoo.checkpoint.load import leaf_names, LoadPlan
from distributed_shampoo.checkpoint.parse import read_index
from distributed_shampoo.checkpoint.plan import plan_global, plan_local
from distributed_shampoo.checkpoint.writer import WrittenFile
from distributed_shampoo.distributed_shampoo import BlockState, block_state_nbytes
from distributed_shampoo.distributor.block_distributor import block_owners
from distributed_shampoo.distributor.block_layout import param_layouts
from distributed_shampoo.distributor.shampoo_block_info import BlockInfo
from distributed_shampoo.preconditioner.grafting import Grafting
from distributed_shampoo.shampoo_types import AdamPreconditionerConfig, block_key, DefaultShampooConfig, ShampooHyperparameters, STEP
from distributed_shampoo.utils.shampoo_checkpoint_utils import flatten

T = TypeVar("T")

LAYERS, HIDDEN, FFN, VOCABULARY, HEADS, KV_HEADS, HEAD_DIM = 80, 8192, 28672, 128256, 64, 8, 128


def transformer_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """The parameters of the 70B model, in model order."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCABULARY, HIDDEN))]
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        shapes += [
            (f"{prefix}.self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
            (f"{prefix}.self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
            (f"{prefix}.self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
            (f"{prefix}.self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
            (f"{prefix}.mlp.gate_proj.weight", (FFN, HIDDEN)),
            (f"{prefix}.mlp.up_proj.weight", (FFN, HIDDEN)),
            (f"{prefix}.mlp.down_proj.weight", (HIDDEN, FFN)),
            (f"{prefix}.input_layernorm.weight", (HIDDEN,)),
            (f"{prefix}.post_attention_layernorm.weight", (HIDDEN,)),
        ]
    return shapes + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCABULARY, HIDDEN))]


@dataclass(frozen=True)
class ShampooState:
    """The blocks of the model at one ``max_preconditioner_dim``: per block its parameter's name,
    its key, its state's tensors (relative key path -> shape) and its state's bytes."""

    names: list[str]
    block_params: list[str]
    block_keys: list[str]
    block_tensors: list[dict[tuple[object, ...], tuple[int, ...]]]
    block_nbytes: list[int]


def shampoo_state(max_dim: int) -> ShampooState:
    shapes = transformer_shapes()
    hyperparameters = ShampooHyperparameters(
        lr=1e-3, beta1=0.9, beta2=0.999, beta3=-1.0, epsilon=1e-12, momentum=0.0, dampening=0.0, weight_decay=0.0,
        max_preconditioner_dim=max_dim, precondition_frequency=100, start_preconditioning_step=-1, use_nesterov=False,
        use_bias_correction=True, use_decoupled_weight_decay=True, use_pin_memory=False,
    )
    grafting = Grafting(AdamPreconditionerConfig())
    _, blocks = param_layouts([shape for _, shape in shapes], [max_dim] * len(shapes))
    tensors_of_shape: dict[tuple[int, ...], dict[tuple[object, ...], tuple[int, ...]]] = {}
    for block in blocks:
        if block.shape not in tensors_of_shape:
            meta = torch.empty(0, device="meta")
            state = BlockState(BlockInfo(meta, (0, block_key(0))), block.shape, hyperparameters, grafting, DefaultShampooConfig)
            tensors_of_shape[block.shape] = {
                tuple(json.loads(key)): tuple(value.shape)
                for key, value in flatten(cast(dict[str, object], state.state_dict())).items()
                if isinstance(value, torch.Tensor)
            }
    return ShampooState(
        names=[name for name, _ in shapes],
        block_params=[shapes[block.param_index][0] for block in blocks],
        block_keys=[block_key(block.block_index) for block in blocks],
        block_tensors=[tensors_of_shape[block.shape] for block in blocks],
        block_nbytes=[
            block_state_nbytes(block.shape, torch.float32, hyperparameters, grafting, DefaultShampooConfig) for block in blocks
        ],
    )


def rank_state(state: ShampooState, owners: tuple[int, ...], rank: int) -> dict[str, object]:
    """What ``distributed_state_dict(layout="nested")`` returns on ``rank`` (one parameter group:
    its step in the first parameter's state), with memoryless tensors: the default, flattened
    layout saves the same checkpoint."""
    params: dict[str, dict[str, object]] = {name: {} for name in state.names}
    params[state.names[0]][STEP] = torch.zeros((), dtype=torch.int64)
    for param, key, tensors, owner in zip(state.block_params, state.block_keys, state.block_tensors, owners):
        if owner != rank:
            continue
        block: dict[object, object] = {}
        for path, shape in tensors.items():
            node = block
            for part in path[:-1]:
                node = cast(dict[object, object], node.setdefault(part, {}))
            node[path[-1]] = torch.empty(1).expand(shape)
        params[param][key] = block
    return {"optimizer": {"state": params}}


def _timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _plan_load(directory: Path, template: dict[str, object]) -> LoadPlan:
    """A load's planning, as ``load_checkpoint`` does it, short of opening the shard files: the
    index entries of the template's leaves (from the loader's files), then the plan of every read."""
    index = read_partial_index(directory, "optimizer", leaf_names(template))
    if index is None:
        raise RuntimeError(f"{directory} has no loader files")
    return LoadPlan(index, template, None, True, True)


def simulate(state: ShampooState, world_size: int, resume_at: int, scratch: Path) -> dict[str, float]:
    owners = block_owners(state.block_nbytes, world_size)
    save_id = new_save_id()
    prepared = []
    plan_bytes: list[int] = []
    datas = []
    for rank in range(world_size):
        plan, data = plan_local(rank_state(state, owners, rank))
        message = _Prepared(plan, None, save_id if rank == 0 else None)
        plan_bytes.append(len(pickle.dumps(message)))
        prepared.append(message)
        datas.append(data)
    planning_s, global_plan = _timed(lambda: plan_global([p.plan for p in prepared if p.plan is not None]))
    decisions = [_Decision(save_id, w, r) for w, r in zip(global_plan.writes, global_plan.replicas)]
    decision_bytes = [len(pickle.dumps(decision)) for decision in decisions]
    files: list[WrittenFile] = []
    for rank, writes in enumerate(global_plan.writes):
        checksums = {name: "0123456789abcdef" for name in writes}
        pages = {
            name: ("0123456789abcdef",) * math.ceil(datas[rank][name].numel() * 4 / PAGE_BYTES)
            for name in writes
            if datas[rank][name].numel() * 4 > PAGE_BYTES
        }
        files.append(WrittenFile(checksums, pages, FileRecord(1 << 40, "0123456789abcdef")))
    record_bytes = [len(pickle.dumps(written)) for written in files]
    target = scratch / f"ckpt-{world_size}"
    staged = StagedSave(target, staging_dir(target, save_id[:16]), save_id, "optimizer", global_plan, [], [], {}, True)
    staged.staging.mkdir()
    commit_s, _ = _timed(lambda: commit_index(staged, global_plan, world_size, files))
    index_path = target / "optimizer.safetensors.index.json"
    parse_s, index = _timed(lambda: read_index(target))
    # One rank resuming at another world size: the one that owns the most tensors there.
    resumed = block_owners(state.block_nbytes, resume_at)
    counts = [0] * resume_at
    for owner, tensors in zip(resumed, state.block_tensors):
        counts[owner] += len(tensors)
    loader = max(range(resume_at), key=lambda rank: counts[rank])
    template = rank_state(state, resumed, loader)
    load_s, load_plan = _timed(lambda: _plan_load(target, template))
    tracemalloc.start()  # a second time: tracing slows allocation-heavy code down severalfold
    _plan_load(target, template)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tensors_per_rank = [len(w) for w in global_plan.writes]
    blocks_per_rank = [0] * world_size
    for owner in owners:
        blocks_per_rank[owner] += 1
    return {
        "world_size": world_size,
        "blocks": len(owners),
        "tensors": len(global_plan.tensors),
        "blocks_per_rank_max": max(blocks_per_rank),
        "tensors_per_rank_max": max(tensors_per_rank),
        "plan_bytes_total": sum(plan_bytes) + sum(decision_bytes) + sum(record_bytes),
        "plan_bytes_coordinator": sum(plan_bytes[1:]) + sum(decision_bytes[1:]) + sum(record_bytes[1:]),
        "coordinator_s": planning_s + commit_s,
        "index_bytes": index_path.stat().st_size,
        "parse_s": parse_s,
        "load_planning_s": load_s,
        "load_planning_peak_bytes": peak,
        "load_reads": len(load_plan.reads),
        "index_tensors": len(index.tensors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[8, 64, 512, 1024])
    parser.add_argument("--max-dims", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--resume-at", type=int, default=768)
    parser.add_argument("--plot", default=None, help="write a plot of the per-rank costs against W here (PNG)")
    args = parser.parse_args()
    rows: dict[int, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for max_dim in args.max_dims:
            state = shampoo_state(int(max_dim))
            print(f"\nmax_preconditioner_dim {max_dim}: {len(state.block_params)} blocks, "
                  f"{sum(state.block_nbytes) / 2**40:.2f} TiB of state")
            print("| W | blocks / rank (max) | tensors / rank (max) | plan bytes, total | at the coordinator | "
                  "coordinator's time (s) | index | whole-index parse (s) | loading rank at "
                  f"{args.resume_at}: planning (s) | its peak memory |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for world_size in args.world_sizes:
                row = simulate(state, int(world_size), int(args.resume_at), Path(tmp))
                rows.setdefault(int(max_dim), []).append(row)
                print(f"| {world_size} | {row['blocks_per_rank_max']:.0f} | {row['tensors_per_rank_max']:.0f} | "
                      f"{row['plan_bytes_total'] / 2**20:.1f} MiB | {row['plan_bytes_coordinator'] / 2**20:.1f} MiB | "
                      f"{row['coordinator_s']:.2f} | {row['index_bytes'] / 2**20:.1f} MiB | {row['parse_s']:.2f} | "
                      f"{row['load_planning_s']:.2f} | {row['load_planning_peak_bytes'] / 2**20:.0f} MiB |", flush=True)
    if args.plot:
        _plot(rows, args.plot, int(args.resume_at))


def _plot(rows: dict[int, list[dict[str, float]]], path: str, resume_at: int) -> None:
    # The optional "bench" extra: imported by name, so that type checks pass without it.
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for max_dim, series in rows.items():
        ws = [row["world_size"] for row in series]
        axes[0].plot(ws, [row["plan_bytes_coordinator"] / 2**20 for row in series], marker="o", label=f"max dim {max_dim}")
        axes[1].plot(ws, [row["coordinator_s"] for row in series], marker="o", label=f"max dim {max_dim}")
        axes[2].plot(ws, [row["load_planning_s"] for row in series], marker="o", label=f"max dim {max_dim}")
    titles = ("bytes at the coordinator (MiB)", "coordinator's plan + commit (s)", f"one loading rank's planning at {resume_at} (s)")
    for axis, title in zip(axes, titles):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("world size W at save")
        axis.set_title(title, fontsize=10)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("70B-parameter Shampoo state: checkpoint coordination against world size")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
