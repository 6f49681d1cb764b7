# pyre-strict
"""The loader's files (format version 3): what lets a loading rank read only the index entries
of the tensors it loads, so its work is proportional to what it reads, not to the checkpoint.

Next to the complete index (the HuggingFace-compatible one, which tools and ``verify`` read):

- ``<prefix>.manifest.json``: the index without its tensor entries (format, save, files, values,
  containers, user metadata), plus the lookup table's size and digest and each part's digest.
- ``<prefix>.lookup.bin``: one 12-byte record per logical tensor, sorted: the xxh3_64 of its
  name (``name_hash``, little-endian u64) and its part (u32).
- ``<prefix>.part-<r+1>-of-<W>.json``: the index entries (layouts, weight map, checksums,
  pages) of the tensors whose first piece is in rank r's shard file, in the index's schema.

They are written only for an index of at least ``LOADER_FILES_MIN_INDEX_BYTES``. Below that, a
loading rank reads the index itself (validating only its own entries) at about the cost of the
parts it would read, and every save is spared encoding all entries a second time; saves are far
more frequent than resumes.

All are derived from the index document, deterministically: ``loader_files`` makes them, and
``verify`` rebuilds them and compares. A loader checks the manifest's digest, the lookup table's digest,
and each part's digest against the manifest, and validates each part as it validates an index.
"""

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import xxhash

from distributed_shampoo.checkpoint.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReplacedError,
    CorruptCheckpointError,
)
from distributed_shampoo.checkpoint.format import (
    CheckpointIndex,
    lookup_file_name,
    manifest_file_name,
    MAX_INDEX_BYTES,
    NAME_TO_DTYPE,
    name_hash,
    part_file_name,
    seal,
)
from distributed_shampoo.checkpoint.parse import Fields, index_json, parse_index_document
from distributed_shampoo.checkpoint.reader import read_small_file

_RECORD: np.dtype = np.dtype([("hash", "<u8"), ("part", "<u4")])

# From this size on, parsing the whole index costs each loading rank more than the loader's files
# cost each save (a save at 6,398 tensors writes a 1.9 MiB index; the 70B state's is 32-82 MiB).
LOADER_FILES_MIN_INDEX_BYTES: int = 8 << 20


def wants_loader_files(index_bytes: int) -> bool:
    """Whether a save whose index text is ``index_bytes`` long writes the loader's files."""
    return index_bytes >= LOADER_FILES_MIN_INDEX_BYTES


def loader_files(document: Mapping[str, Mapping[str, object]]) -> dict[str, bytes]:
    """File name -> content of the manifest, the lookup table and every part of the index
    ``document`` (``index_document``'s form; its digest, if any, is ignored).

    Raises:
        KeyError, TypeError, ValueError: ``document`` is not a well-formed index document.
    """
    metadata = dict(document["metadata"])
    metadata.pop("index_digest", None)
    weight_map = cast(dict[str, str], document["weight_map"])
    prefix, world_size = str(metadata["prefix"]), int(cast(int, metadata["world_size"]))
    tensors = cast(dict[str, dict[str, object]], metadata["tensors"])
    checksums = cast(dict[str, str], metadata["checksums"])
    pages = cast(dict[str, str], metadata["pages"])
    file_rank = {name: rank for rank, name in enumerate(sorted(cast(dict[str, object], metadata["files"])))}
    by_part: list[list[str]] = [[] for _ in range(world_size)]
    pieces_of: dict[str, list[str]] = {}
    for name, entry in tensors.items():
        chunks = cast(list[dict[str, object]], entry.get("chunks", []))
        pieces_of[name] = [str(chunk["name"]) for chunk in chunks] or [name]
        by_part[file_rank[weight_map[pieces_of[name][0]]]].append(name)
    contents: dict[str, bytes] = {}
    part_digests: list[str] = []
    for rank, names in enumerate(by_part):
        pieces = [piece for name in names for piece in pieces_of[name]]
        part_metadata = {
            **metadata,
            "total_size": sum(_nbytes(tensors[name]) for name in names),
            "files": {},
            "tensors": {name: tensors[name] for name in names},
            "checksums": {piece: checksums[piece] for piece in pieces},
            "pages": {piece: pages[piece] for piece in pieces if piece in pages},
            "objects": {},
            "containers": {},
            "user": {},
            "part": rank + 1,
        }
        part_weight_map: dict[str, object] = {piece: weight_map[piece] for piece in pieces}
        part: dict[str, dict[str, object]] = {"metadata": part_metadata, "weight_map": part_weight_map}
        contents[part_file_name(prefix, rank, world_size)] = seal(part).encode()
        part_digests.append(str(part["metadata"]["index_digest"]))  # set by seal
    records = np.array(sorted((name_hash(name), rank) for rank, names in enumerate(by_part) for name in names), dtype=_RECORD)
    lookup = records.tobytes()
    loader = {"lookup": {"size": len(lookup), "digest": xxhash.xxh3_64_hexdigest(lookup)}, "parts": part_digests}
    manifest = {**metadata, "tensors": {}, "checksums": {}, "pages": {}, "loader": loader}
    contents[manifest_file_name(prefix)] = seal({"metadata": manifest, "weight_map": {}}).encode()
    contents[lookup_file_name(prefix)] = lookup
    return contents


def _nbytes(entry: Mapping[str, object]) -> int:
    return math.prod(cast(list[int], entry["shape"])) * NAME_TO_DTYPE[str(entry["dtype"])].itemsize


def read_partial_index(directory: Path, prefix: str, names: Iterable[str]) -> CheckpointIndex | None:
    """The index restricted to the tensors ``names`` (those the checkpoint holds), from the
    loader's files; None when the checkpoint has none (format versions 1 and 2).

    Raises:
        CorruptCheckpointError, IncompatibleFormatError, CheckpointReadError: A loader file is
            damaged, of another version, or unreadable.
        CheckpointReplacedError: A part belongs to another save than the manifest.
    """
    manifest_path = directory / manifest_file_name(prefix)
    if not manifest_path.exists():
        return None
    manifest, manifest_document = _read_manifest(manifest_path)
    lookup_size, lookup_digest, part_digests = _loader_fields(manifest_path, manifest_document, manifest.world_size)
    lookup_path = directory / lookup_file_name(prefix)
    lookup = read_small_file(lookup_path, "lookup table", lookup_size, CorruptCheckpointError)
    if len(lookup) != lookup_size or xxhash.xxh3_64_hexdigest(lookup) != lookup_digest:
        _raise_if_replaced(manifest_path, manifest)
        raise CorruptCheckpointError(f"{lookup_path}: the lookup table does not match the manifest's size and digest")
    records = np.frombuffer(lookup, dtype=_RECORD)
    if records.size and (np.any(records["part"] >= manifest.world_size) or np.any(records["hash"][1:] < records["hash"][:-1])):
        raise CorruptCheckpointError(f"{lookup_path}: the lookup table is not sorted or names a part beyond {manifest.world_size}")
    hashes: list[int] = records["hash"].tolist()
    record_parts: list[int] = records["part"].tolist()
    wanted = set(names)
    found: set[int] = set()
    for name_key in {name_hash(name) for name in wanted}:
        found.update(record_parts[bisect.bisect_left(hashes, name_key) : bisect.bisect_right(hashes, name_key)])
    parts = sorted(found)
    tensors, weight_map, checksums, pages = {}, {}, {}, {}
    for part in parts:
        path = directory / part_file_name(prefix, part, manifest.world_size)
        text = read_small_file(path, "index part", MAX_INDEX_BYTES, CorruptCheckpointError)
        document = index_json(text, path, "index part")
        loaded = parse_index_document(path, document, "part", manifest, wanted, text)
        recorded = document["metadata"]["index_digest"] if isinstance(document, dict) and isinstance(document.get("metadata"), dict) else None
        if recorded != part_digests[part]:
            _raise_if_replaced(manifest_path, manifest)
            raise CorruptCheckpointError(f"{path}: its digest is not the one the manifest records for part {part + 1}")
        tensors.update(loaded.tensors)
        weight_map.update(loaded.weight_map)
        checksums.update(loaded.checksums)
        pages.update(loaded.pages)
    return replace(manifest, tensors=tensors, weight_map=weight_map, checksums=checksums, pages=pages)


def _read_manifest(path: Path) -> tuple[CheckpointIndex, object]:
    """The manifest, validated, and its parsed document."""
    text = read_small_file(path, "manifest", MAX_INDEX_BYTES, CheckpointNotFoundError)
    document = index_json(text, path, "manifest")
    return parse_index_document(path, document, "manifest", text=text), document


def _raise_if_replaced(path: Path, manifest: CheckpointIndex) -> None:
    """Raises ``CheckpointReplacedError`` if the manifest now on disk is another save's: a file
    read after it that does not match it is then the new save's, not damage."""
    try:
        current, _ = _read_manifest(path)
    except CheckpointError:
        return
    if current.save_id != manifest.save_id:
        raise CheckpointReplacedError(f"{path.parent} was replaced by another save while it was read")


def _loader_fields(path: Path, document: object, world_size: int) -> tuple[int, str, list[str]]:
    """The manifest's ``loader`` field: the lookup table's size and digest, the parts' digests."""
    fields = Fields(path)
    metadata = fields.obj(fields.obj(document, "the manifest").get("metadata"), '"metadata"')
    loader = fields.obj(metadata.get("loader"), '"loader"')
    lookup = fields.obj(loader.get("lookup"), '"loader" "lookup"')
    size = fields.integer(lookup.get("size"), '"loader" "lookup" "size"')
    if size % _RECORD.itemsize or size > MAX_INDEX_BYTES:
        raise fields.fail('"loader" "lookup" "size"', f"{size} is not a whole number of {_RECORD.itemsize}-byte records within the limit")
    digest = fields.hex(lookup.get("digest"), '"loader" "lookup" "digest"', 16)
    parts = loader.get("parts")
    if not isinstance(parts, list) or len(parts) != world_size:
        raise fields.fail('"loader" "parts"', f"expected the digests of {world_size} parts")
    return size, digest, [fields.hex(part, f'"loader" "parts" {position}', 32) for position, part in enumerate(parts)]
