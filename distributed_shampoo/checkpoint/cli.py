# pyre-strict
"""``python -m distributed_shampoo.checkpoint`` (console script ``distributed-shampoo-checkpoint``).

Commands: ``inspect``, ``verify``, ``consolidate``, ``reshard`` and ``diff``. Expected failures
(a missing or damaged checkpoint, an existing output) print one line to stderr, no traceback.
Exit status: 0 success; 1 failure (``verify``: the checkpoint is damaged; ``diff``: the
checkpoints differ); 2 bad usage, or an error in ``diff``.
"""

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import cast, TextIO

from distributed_shampoo.checkpoint.api import check_checkpoint
from distributed_shampoo.checkpoint.errors import CheckpointError
from distributed_shampoo.checkpoint.parse import read_index
from distributed_shampoo.checkpoint.offline import consolidate_checkpoint, diff_checkpoints, rewrite_checkpoint, summarize
from distributed_shampoo.distributor.block_distributor import checkpoint_writes


class ProgressLine:
    """Reports ``done/total`` on stderr: one rewritten line on a terminal, else a line per 25%."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self._label = label
        self._stream: TextIO = stream if stream is not None else sys.stderr
        self._next_quarter = 1

    def __call__(self, done: int, total: int) -> None:
        if self._stream.isatty():
            end = "\n" if done >= total else ""
            self._stream.write(f"\r{self._label}: {done}/{total}{end}")
        elif total and done * 4 >= self._next_quarter * total:
            self._stream.write(f"{self._label}: {done}/{total}\n")
            self._next_quarter = done * 4 // total + 1
        self._stream.flush()


# The shapes of ``summarize``'s rows (it builds them; nothing here comes from disk unchecked).
_Rows = dict[str, dict[str, int]]


def _size(nbytes: object) -> str:
    nbytes = cast(int, nbytes)
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _table(title: str, rows: dict[str, dict[str, int]], first: str) -> list[str]:
    lines = [f"\n{title}", f"| {first} | tensors | bytes |", "|---|---:|---:|"]
    lines += [f"| {key} | {row['tensors']} | {_size(row['bytes'])} |" for key, row in rows.items()]
    return lines


def _inspect(args: argparse.Namespace) -> int:
    summary = summarize(read_index(args.dir))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    files = cast(_Rows, summary["files"])
    lines = [
        f"checkpoint {summary['path']}",
        f"format version {summary['format_version']}, saved by {summary['world_size']} ranks, "
        f"{summary['tensors']} tensors ({summary['stored_tensors']} stored pieces), {summary['values']} other values, "
        f"{_size(summary['total_size'])}",
        f"user metadata: {json.dumps(summary['user_metadata'])}",
        "\nfiles",
        "| rank | file | tensors | bytes |",
        "|---:|---|---:|---:|",
    ]
    lines += [f"| {row['rank']} | {file} | {row['tensors']} | {_size(row['bytes'])} |" for file, row in files.items()]
    dtypes, parameters = cast(_Rows, summary["dtypes"]), cast(_Rows, summary["parameters"])
    lines += _table("dtypes", dtypes, "dtype") + _table("parameters", parameters, "parameter")
    print("\n".join(lines))
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = check_checkpoint(args.dir, progress=ProgressLine("verify: files"))
    index = report.index
    if report.ok and index is not None:
        print(
            f"OK: {index.directory}: {report.files_checked} files, {len(index.weight_map)} stored tensors, "
            f"{_size(index.total_size)}, every checksum matches"
        )
        return 0
    print(f"FAILED: {args.dir}: {len(report.problems)} problem(s)", file=sys.stderr)
    for problem in report.problems:
        print(f"  {type(problem).__name__}: {problem}", file=sys.stderr)
    return 1


def _consolidate(args: argparse.Namespace) -> int:
    out = consolidate_checkpoint(args.dir, args.out, progress=ProgressLine("consolidate: tensors"))
    print(f"wrote {out} ({_size(out.stat().st_size)})")
    return 0


def _reshard(args: argparse.Namespace) -> int:
    source = read_index(args.dir)
    layouts = {name: (layout.shape, layout.dtype) for name, layout in source.tensors.items()}
    # The optimizer decides who owns which block; the checkpoint layer only rewrites.
    writes = checkpoint_writes(layouts, args.world_size)
    index = rewrite_checkpoint(args.dir, args.out, writes, progress=ProgressLine("reshard: ranks"))
    files = cast(_Rows, summarize(index)["files"])
    print(f"wrote {index.directory} for {index.world_size} ranks")
    for file, row in files.items():
        print(f"  rank {row['rank']}: {file}: {row['tensors']} tensors, {_size(row['bytes'])}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    diff = diff_checkpoints(args.a, args.b, progress=ProgressLine("diff: tensors"))
    if diff.identical:
        print(f"identical: {diff.equal_tensors} tensors and every value are equal")
        return 0
    for label, names in (("only in A", diff.only_in_a), ("only in B", diff.only_in_b)):
        for name in names:
            print(f"{label}: {name}")
    for name, a_value, b_value in diff.values:
        print(f"value differs: {name}: A={a_value!r} B={b_value!r}")
    if diff.tensors:
        print("| tensor | differs in | elements | max abs | max rel |\n|---|---|---:|---:|---:|")
        for d in sorted(diff.tensors, key=lambda d: -d.max_abs):
            print(f"| {d.name} | {d.problem} | {d.elements} | {d.max_abs:.3e} | {d.max_rel:.3e} |")
    print(
        f"{len(diff.tensors)} tensors differ, {diff.equal_tensors} equal; {len(diff.values)} values differ; "
        f"{len(diff.only_in_a)} only in A, {len(diff.only_in_b)} only in B"
    )
    return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distributed_shampoo.checkpoint", description="Inspect, check and convert checkpoints."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="format, world size, metadata, tensors and bytes per rank and parameter")
    inspect.add_argument("dir")
    inspect.add_argument("--json", action="store_true", help="print a JSON document")
    inspect.set_defaults(run=_inspect, error_status=1)
    verify = commands.add_parser("verify", help="check every file against the index and every checksum")
    verify.add_argument("dir")
    verify.set_defaults(run=_verify, error_status=1)
    consolidate = commands.add_parser("consolidate", help="write every tensor, whole, into one safetensors file")
    consolidate.add_argument("dir")
    consolidate.add_argument("out", help="the .safetensors file to create")
    consolidate.set_defaults(run=_consolidate, error_status=1)
    reshard = commands.add_parser("reshard", help="rewrite block-owned optimizer state for another number of ranks")
    reshard.add_argument("dir")
    reshard.add_argument("out", help="the checkpoint directory to create")
    reshard.add_argument("--world-size", type=int, required=True)
    reshard.set_defaults(run=_reshard, error_status=1)
    diff = commands.add_parser("diff", help="which tensors differ between two checkpoints, and by how much")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.set_defaults(run=_diff, error_status=2)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns the exit status."""
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return int(args.error_status)
    except Exception as error:  # one line, no traceback, whatever went wrong
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return int(args.error_status)

