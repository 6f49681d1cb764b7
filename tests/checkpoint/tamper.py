# pyre-strict
"""Edits a saved checkpoint's files the way a damaged disk or a hostile user would.

``reseal`` recomputes the integrity fields (each file's size and header digest, the index digest)
after an edit, so a test can reach the checks behind them: a resealed edit is what a deliberately
crafted index looks like.
"""

import json
import struct
from collections.abc import Callable
from pathlib import Path

from distributed_shampoo.checkpoint.format import checksum, index_digest

INDEX = "optimizer.safetensors.index.json"

Document = dict[str, dict[str, object]]


def read_document(directory: Path) -> Document:
    return json.loads((directory / INDEX).read_text())


def write_document(directory: Path, document: object) -> None:
    (directory / INDEX).write_text(json.dumps(document, separators=(",", ":")))


def reseal(directory: Path) -> None:
    """Recomputes every file record and the index digest from the files as they are now."""
    document = read_document(directory)
    metadata = document["metadata"]
    files = metadata["files"]
    assert isinstance(files, dict)
    for name in files:
        data = (directory / name).read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        files[name] = {"size": len(data), "header_digest": checksum(data[8 : 8 + length])}
    metadata.pop("index_digest", None)
    metadata["index_digest"] = index_digest(document)
    write_document(directory, document)


def edit_index(edit: Callable[[Document], None], sealed: bool = True) -> Callable[[Path], None]:
    """A damage that edits the parsed index (then reseals it unless ``sealed`` is false)."""

    def apply(directory: Path) -> None:
        document = read_document(directory)
        edit(document)
        write_document(directory, document)
        if sealed:
            reseal(directory)

    return apply


def replace_in_file(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data, (old, path)
    path.write_bytes(data.replace(old, new, 1))


def rewrite_header(path: Path, edit: Callable[[dict[str, object]], None]) -> None:
    """Rewrites a shard file's JSON header (same data bytes after it)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])
