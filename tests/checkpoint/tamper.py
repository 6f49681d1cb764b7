# pyre-strict
"""Edits a saved checkpoint's files the way a damaged disk or a hostile user would.

``reseal`` recomputes the integrity fields (each file's size and header digest, the index digest)
after an edit, so a test can reach the checks behind them: a resealed edit is what a deliberately
crafted index looks like. It writes the index in ``seal``'s layout, as the library does, so that a
load decodes it as it decodes a real index (lazily, entry by entry).
"""

import contextlib
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

from distributed_shampoo.checkpoint import index_parts
from distributed_shampoo.checkpoint.format import checksum, index_digest, seal

INDEX = "optimizer.safetensors.index.json"

Document = dict[str, dict[str, object]]


def read_document(directory: Path) -> Document:
    return json.loads((directory / INDEX).read_text())


def write_document(directory: Path, document: object) -> None:
    (directory / INDEX).write_text(json.dumps(document, separators=(",", ":")))


def reseal(directory: Path) -> None:
    """Recomputes every file record and the index digest from the files as they are now, and
    rebuilds the loader's files from the index (removes them if it is not well-formed enough)."""
    document = read_document(directory)
    metadata = document["metadata"]
    files = metadata["files"]
    assert isinstance(files, dict)
    for name in files:
        data = (directory / name).read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        files[name] = {"size": len(data), "header_digest": checksum(data[8 : 8 + length])}
    metadata.pop("index_digest", None)
    sealed = None
    if metadata:  # seal's layout splices the digest in before another field of "metadata"
        try:
            sealed = seal(document)  # the library's own layout, so loads take the path they take for real files
        except (ValueError, TypeError):
            pass  # not JSON the library can write (NaN, a non-str key); seal changed nothing
    if sealed is not None:
        (directory / INDEX).write_text(sealed)
    else:
        metadata["index_digest"] = index_digest(document)
        write_document(directory, document)
    drop_loader_files(directory)
    if not isinstance(files, dict) or metadata.get("world_size") != len(files):
        return  # one part per rank: an edited world size would make millions of them
    try:
        add_loader_files(directory)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return  # a loader then reads the whole index, as for a checkpoint of format 2


def add_loader_files(directory: Path) -> None:
    """Writes the loader's files a save writes for a large index (derived from the index)."""
    for name, content in index_parts.loader_files(read_document(directory)).items():
        (directory / name).write_bytes(content)


@contextlib.contextmanager
def writing_loader_files() -> Iterator[None]:
    """Saves inside write the loader's files whatever the size of their index (by default they
    are written only for large indexes)."""
    with mock.patch.object(index_parts, "LOADER_FILES_MIN_INDEX_BYTES", 0):
        yield


def drop_loader_files(directory: Path) -> None:
    """Removes the loader's files, so that every load reads the whole index (as in format 2)."""
    for stale in [*directory.glob("*.manifest.json"), *directory.glob("*.lookup.bin"), *directory.glob("*.part-*.json")]:
        stale.unlink()


def edit_index(edit: Callable[[Document], None], sealed: bool = True) -> Callable[[Path], None]:
    """A damage that edits the parsed index (then reseals it unless ``sealed`` is false)."""

    def apply(directory: Path) -> None:
        document = read_document(directory)
        edit(document)
        write_document(directory, document)
        if sealed:
            reseal(directory)
        else:
            drop_loader_files(directory)

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
