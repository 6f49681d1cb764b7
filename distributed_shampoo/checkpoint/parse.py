# pyre-strict
"""Reads the index and the shard headers as hostile input.

Every field is type-checked before it is used, every size is checked against what the files hold
before anything is allocated for it, and (format version 2) the index's digest and each header's
digest must match, so a changed byte either loads nothing or is reported as a typed error.

Text whose digest matches (the bytes this library wrote) is decoded lazily with msgspec: each
entry of the per-tensor maps stays raw JSON text (``msgspec.Raw``) until it is read, and an
entry is decoded straight into typed fields (``_StoredLayout``, ``_StoredEntry``) whose types and
ranges msgspec checks in C. A loading rank thus decodes only its own entries. An entry that does
not decode that way is decoded as plain JSON and checked field by field, which says what is wrong.
"""

import json
import math
import os
import re
import stat
import struct
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Annotated, cast, TypeVar

import msgspec
import torch

from distributed_shampoo.checkpoint.errors import (
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointReplacedError,
    CorruptCheckpointError,
    IncompatibleFormatError,
    IndexMismatchError,
    InvalidArgumentError,
)
from distributed_shampoo.checkpoint.format import (
    CHECKSUM_ALGORITHM,
    check_prefix,
    CheckpointIndex,
    FIRST_VERSION_WITH_PARTS,
    checksum,
    chunk_name,
    ChunkLayout,
    DTYPE_TO_NAME,
    FileRecord,
    FORMAT_NAME,
    HeaderEntry,
    index_digest,
    index_file_name,
    manifest_file_name,
    MAX_HEADER_BYTES,
    MAX_INDEX_BYTES,
    NAME_TO_DTYPE,
    PAGE_BYTES,
    part_file_name,
    READABLE_VERSIONS,
    sealed_digest,
    shard_header_metadata,
    TensorLayout,
    whole_layout,
    tiling_problem,
)
from distributed_shampoo.checkpoint.reader import read_small_file
from distributed_shampoo.checkpoint.values import decode_value
from distributed_shampoo.utils.shampoo_checkpoint_utils import encode_key, Key

_HEX: frozenset[str] = frozenset("0123456789abcdef")
# A key path of printable-ASCII strings (no quote, no backslash) and integers, exactly as
# ``encode_key`` writes it: a name of this form is canonical without re-encoding it.
_SIMPLE_KEY: str = r'(?:"[ !#-\[\]-~]*"|0|-?[1-9][0-9]{0,17})'
_CANONICAL_NAME: re.Pattern[str] = re.compile(rf"\[{_SIMPLE_KEY}(?:, {_SIMPLE_KEY})*\]")
_CONTAINER_KINDS: tuple[str, ...] = ("list", "tuple", "dict")


_RAW_OBJECT: msgspec.json.Decoder[dict[str, msgspec.Raw]] = msgspec.json.Decoder(dict[str, msgspec.Raw])
_Raw = msgspec.Raw | msgspec.UnsetType


class _SealedMetadata(msgspec.Struct, forbid_unknown_fields=True):
    """The metadata of an index, a manifest or a part as ``seal`` writes it, decoded by
    ``index_json`` in the same pass as the rest: the maps with an entry per stored tensor typed
    (layouts raw until read; digests strings, checked as such in C), every other field raw, for
    the ``json`` module. A field not listed here fails the decode (``strict_json`` then parses)."""

    tensors: dict[str, msgspec.Raw]
    checksums: dict[str, str]
    pages: dict[str, str]
    total_size: _Raw = msgspec.UNSET
    format: _Raw = msgspec.UNSET
    format_version: _Raw = msgspec.UNSET
    prefix: _Raw = msgspec.UNSET
    world_size: _Raw = msgspec.UNSET
    checksum_algorithm: _Raw = msgspec.UNSET
    save_id: _Raw = msgspec.UNSET
    page_bytes: _Raw = msgspec.UNSET
    files: _Raw = msgspec.UNSET
    objects: _Raw = msgspec.UNSET
    containers: _Raw = msgspec.UNSET
    user: _Raw = msgspec.UNSET
    index_digest: _Raw = msgspec.UNSET
    part: _Raw = msgspec.UNSET
    loader: _Raw = msgspec.UNSET


class _SealedIndex(msgspec.Struct, forbid_unknown_fields=True):
    metadata: _SealedMetadata
    weight_map: dict[str, str]


_SEALED_INDEX: msgspec.json.Decoder[_SealedIndex] = msgspec.json.Decoder(_SealedIndex)
_PER_TENSOR_FIELDS: tuple[str, ...] = ("tensors", "checksums", "pages")
_Size = Annotated[int, msgspec.Meta(ge=0)]


class _StoredChunk(msgspec.Struct):
    name: str
    offsets: list[_Size]
    shape: list[_Size]


class _StoredLayout(msgspec.Struct):
    """An index's tensor entry, as msgspec checks its types (unknown fields are ignored, as the
    field-by-field parser ignores them; a missing or null field fails, as there)."""

    dtype: str
    shape: list[_Size]
    chunks: list[_StoredChunk] | msgspec.UnsetType = msgspec.UNSET


class _StoredEntry(msgspec.Struct):
    """A safetensors header entry, as msgspec checks its types."""

    dtype: str
    shape: list[_Size]
    data_offsets: tuple[_Size, _Size]


_LAYOUT: msgspec.json.Decoder[_StoredLayout] = msgspec.json.Decoder(_StoredLayout)
_LAYOUTS: msgspec.json.Decoder[list[_StoredLayout]] = msgspec.json.Decoder(list[_StoredLayout])
_ENTRY: msgspec.json.Decoder[_StoredEntry] = msgspec.json.Decoder(_StoredEntry)
_ENTRIES: msgspec.json.Decoder[list[_StoredEntry]] = msgspec.json.Decoder(list[_StoredEntry])


class _DuplicateKey(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _DuplicateKey(f"duplicate key {duplicate!r}")
    return document


def _no_constant(word: str) -> object:
    raise ValueError(f"{word} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def strict_json(data: bytes, path: Path, what: str) -> object:
    """Parses JSON that must be exactly what this layer writes: duplicate keys, ``NaN`` and
    ``Infinity`` literals and numbers out of float range are errors.

    Fast paths: text that is byte for byte what ``seal`` writes (its digest matches the rest), or
    what ``json.dumps(..., separators=(",", ":"))`` makes of its own parse, can hold none of these,
    so the slower checking parser runs only on other text. (Sealed text holds them only if it was
    forged along with its digest, which no checksum can prevent; the schema checks still apply.)

    Raises:
        CorruptCheckpointError: Names ``path`` and what is wrong.
    """
    try:
        document = json.loads(data)
        if sealed_digest(data) is not None or json.dumps(document, separators=(",", ":"), allow_nan=False).encode() == data.rstrip(b"\n"):
            return document
    except (ValueError, UnicodeDecodeError, RecursionError):
        pass  # the checking parser says what is wrong
    try:
        return json.loads(
            data, object_pairs_hook=_object_without_duplicates, parse_constant=_no_constant, parse_float=_finite_float
        )
    except RecursionError:
        raise CorruptCheckpointError(f"{path}: the {what} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptCheckpointError(f"{path}: the {what} is not valid JSON ({error})") from None


def index_json(data: bytes, path: Path, what: str) -> object:
    """``strict_json`` for index-shaped text (an index, an index part, a manifest).

    Text that ``seal`` wrote (``sealed_digest`` matches) is decoded by msgspec in one pass:
    ``weight_map``, ``checksums`` and ``pages`` as maps of strings, ``tensors`` as a map of
    ``msgspec.Raw`` entries, which ``parse_index_document`` decodes as it reads them (a load reads
    its own); the other fields are decoded by the ``json`` module, as ``strict_json`` decodes
    them. Other text, or text with fields or maps of another kind (``_SealedMetadata``), goes to
    ``strict_json`` (its schema checks then say what is wrong).

    Raises:
        CorruptCheckpointError: As ``strict_json``.
    """
    if sealed_digest(data) is not None:
        try:
            sealed = _SEALED_INDEX.decode(data)
            metadata: dict[str, object] = {}
            for key in sealed.metadata.__struct_fields__:
                value = getattr(sealed.metadata, key)
                if key in _PER_TENSOR_FIELDS:
                    metadata[key] = value
                elif value is not msgspec.UNSET:
                    metadata[key] = json.loads(bytes(value))
            return {"metadata": metadata, "weight_map": sealed.weight_map}
        except (msgspec.DecodeError, ValueError, RecursionError):
            pass
    return strict_json(data, path, what)


class Fields:
    """Typed access to fields of a parsed JSON document; every failure names file and field."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._names: dict[str, tuple[Key, ...]] = {}  # names already decoded

    def fail(self, field: str, problem: str) -> CorruptCheckpointError:
        """The error for ``field`` (built by concatenation on the hot path, shortened here)."""
        if len(field) > 160:
            field = field[:157] + "..."
        return CorruptCheckpointError(f"{self.path}: {field}: {problem}")

    def decoded(self, value: object, field: str) -> object:
        """``value``, decoded by the ``json`` module (as ``strict_json`` decodes) if it is a lazily
        decoded entry (``index_json``, a header's), for the field-by-field checks."""
        if not isinstance(value, msgspec.Raw):
            return value
        try:
            return json.loads(bytes(value))
        except (ValueError, RecursionError) as error:
            raise self.fail(field, f"is not valid JSON ({error})") from None

    def obj(self, value: object, field: str) -> dict[str, object]:
        if not isinstance(value, dict):
            raise self.fail(field, f"expected an object, got {_short(value)}")
        return value

    def integer(self, value: object, field: str, minimum: int = 0) -> int:
        if type(value) is not int or value < minimum:
            raise self.fail(field, f"expected an integer >= {minimum}, got {_short(value)}")
        return value

    def text(self, value: object, field: str) -> str:
        if not isinstance(value, str):
            raise self.fail(field, f"expected a string, got {_short(value)}")
        return value

    def hex(self, value: object, field: str, digits: int) -> str:
        text = self.text(value, field)
        if len(text) != digits or not _HEX.issuperset(text):
            raise self.fail(field, f"expected {digits} lowercase hex digits, got {_short(value)}")
        return text

    def dims(self, value: object, field: str) -> tuple[int, ...]:
        if not isinstance(value, list):
            raise self.fail(field, f"expected a list of sizes, got {_short(value)}")
        if not all(type(d) is int for d in value) or (value and min(value) < 0):
            bad = next(d for d in value if type(d) is not int or d < 0)
            raise self.fail(field, f"expected an integer >= 0, got {_short(bad)}")
        return tuple(value)

    def name(self, value: str, field: str) -> tuple[Key, ...]:
        """The key path a logical name encodes; it must be in the canonical form ``encode_key``
        writes, so one key cannot appear under two spellings."""
        known = self._names.get(value)
        if known is not None:
            return known
        if _CANONICAL_NAME.fullmatch(value):
            self._names[value] = decoded = tuple(json.loads(value))
            return decoded
        try:
            path = json.loads(value)
        except (ValueError, RecursionError):
            raise self.fail(field, f"{_short(value)} is not a JSON-list key") from None
        if (
            not isinstance(path, list)
            or not path
            or any(isinstance(key, bool) or not isinstance(key, (str, int)) for key in path)
            or encode_key(path) != value
        ):
            raise self.fail(field, f"{_short(value)} is not a key path written by this library")
        self._names[value] = decoded = tuple(path)
        return decoded


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def find_index_file(directory: Path) -> Path:
    """Returns the only ``*.safetensors.index.json`` in ``directory``.

    Raises:
        CheckpointNotFoundError: If there is none (the directory is missing or was never
            completed), or if there are several.
        CheckpointReplacedError: It found none because another save's overwrite swapped a new
            checkpoint in while the directory was listed (the listing saw the old one deleted).
        CheckpointReadError: The directory cannot be listed.
    """
    listed = _directory_identity(directory)
    if listed is None:
        raise CheckpointNotFoundError(f"no checkpoint at {directory}: not a directory")
    try:
        candidates = sorted(e.name for e in os.scandir(directory) if e.name.endswith(".safetensors.index.json"))
    except OSError as error:
        raise CorruptCheckpointError(f"{directory}: cannot list the directory: {error.strerror or error}") from None
    if not candidates and _directory_identity(directory) not in (listed, None):
        raise CheckpointReplacedError(f"{directory} was replaced by another save while it was listed; load it again")
    if len(candidates) != 1:
        what = "no index file" if not candidates else f"several index files {candidates}"
        raise CheckpointNotFoundError(f"no complete checkpoint in {directory}: {what}")
    return directory / candidates[0]


def _directory_identity(directory: Path) -> tuple[int, int] | None:
    """The (device, inode) of the directory at ``directory`` now, or None if there is none."""
    try:
        status = os.stat(directory)
    except OSError:
        return None
    return (status.st_dev, status.st_ino) if stat.S_ISDIR(status.st_mode) else None


def read_index(directory: str | os.PathLike[str], wanted: Collection[str] | None = None) -> CheckpointIndex:
    """Reads and validates the index of the checkpoint in ``directory``: the whole of it, or (with
    ``wanted``, logical tensor names) only those tensors' entries, as ``parse_index_document``.

    Raises:
        CheckpointNotFoundError: No complete checkpoint there.
        IncompatibleFormatError: Another format, or a newer format version.
        CorruptCheckpointError: The index is not a regular file, too large, not valid JSON,
            breaks the schema or fails its digest; the message names the file and the field.
        CheckpointReadError: It cannot be read.
    """
    path = find_index_file(Path(directory))
    data = read_small_file(path, "index", MAX_INDEX_BYTES, CheckpointNotFoundError)
    return parse_index_document(path, index_json(data, path, "index"), "index", wanted=wanted, text=data)


def parse_index_document(
    path: Path,
    document: object,
    kind: str,
    manifest: CheckpointIndex | None = None,
    wanted: Collection[str] | None = None,
    text: bytes | None = None,
) -> CheckpointIndex:
    """Validates an index-shaped document: the whole index (``kind`` "index"), a loader's
    manifest ("manifest": everything but the tensor entries) or an index part ("part": tensor
    entries only; the files, save and page size are ``manifest``'s).

    Each kind checks everything it holds: the digest, every field's type, and the cross-checks
    among its own entries. Only the whole index can be checked as a whole (``total_size``, the
    tree of leaves and containers, every file's total). A part or an index read for the tensors
    ``wanted`` keeps and checks only their entries (beyond the digest, which covers it all): a loading rank's
    work follows what it loads, not how the saving ranks grouped the entries. ``text``, the bytes
    ``document`` was parsed from, lets a text laid out as ``seal`` writes it be checked against
    its digest without encoding the document again.

    Raises:
        IncompatibleFormatError, CorruptCheckpointError: As ``read_index``.
    """
    fields = Fields(path)
    top = fields.obj(document, f"the {kind}")
    metadata = fields.obj(top.get("metadata"), '"metadata"')
    weight_map = fields.obj(top.get("weight_map"), '"weight_map"')
    if metadata.get("format") != FORMAT_NAME:
        raise IncompatibleFormatError(
            f"{path}: format {_short(metadata.get('format'))} is not {FORMAT_NAME!r}; "
            "this is not a distributed_shampoo checkpoint"
        )
    version = metadata.get("format_version")
    readable = READABLE_VERSIONS if kind == "index" else tuple(v for v in READABLE_VERSIONS if v >= FIRST_VERSION_WITH_PARTS)
    if type(version) is not int or version not in readable:
        raise IncompatibleFormatError(
            f"{path}: format_version {_short(version)} is not supported (this library reads "
            f"{', '.join(map(str, readable))})"
        )
    if metadata.get("checksum_algorithm") != CHECKSUM_ALGORITHM:
        raise IncompatibleFormatError(
            f"{path}: checksum_algorithm {_short(metadata.get('checksum_algorithm'))} is not {CHECKSUM_ALGORITHM!r}"
        )
    if version >= 2:
        _check_digest(fields, top, metadata, text)
    try:
        prefix = check_prefix(metadata.get("prefix"))
    except InvalidArgumentError as error:
        raise fields.fail('"prefix"', str(error)) from None
    world_size = fields.integer(metadata.get("world_size"), '"world_size"', minimum=1)
    expected_name = {
        "index": lambda: index_file_name(prefix),
        "manifest": lambda: manifest_file_name(prefix),
        "part": lambda: part_file_name(prefix, fields.integer(metadata.get("part"), '"part"') - 1, world_size),
    }[kind]()
    if path.name != expected_name:
        raise fields.fail('"prefix"', f"{prefix!r} does not match the {kind}'s file name")
    if manifest is not None:
        files, save_id, page_bytes = manifest.files, manifest.save_id, manifest.page_bytes
        if world_size != manifest.world_size or prefix != manifest.prefix or metadata.get("save_id") != save_id:
            raise CheckpointReplacedError(f"{path}: the part belongs to another save than {manifest.directory}'s manifest")
    else:
        files = _parse_files(fields, metadata, prefix, world_size) if version >= 2 else {}
        save_id = fields.hex(metadata.get("save_id"), '"save_id"', 32) if version >= 2 else ""
        page_bytes = fields.integer(metadata.get("page_bytes"), '"page_bytes"', minimum=1) if version >= 2 else PAGE_BYTES
    if version == 1:
        _check_world_size_v1(fields, path.parent, world_size)
    raw_tensors = fields.obj(metadata.get("tensors"), '"tensors"')
    if wanted is not None:
        raw_tensors = {name: raw_tensors[name] for name in wanted if name in raw_tensors}
    # A wanted name is the load's own encoding of a template path, canonical by construction.
    tensors = _parse_layouts(fields, raw_tensors, check_names=wanted is None)
    if kind == "manifest" and (tensors or weight_map):
        raise fields.fail('"tensors"', "a manifest holds no tensor entries (the parts do)")
    pieces = {piece: (layout.dtype, shape) for name, layout in tensors.items() for piece, shape in layout.piece_shapes(name)}
    partial = wanted is not None
    weight_map = _piece_entries(fields, weight_map, pieces, '"weight_map"', partial)
    shard_files = set(files) if version >= 2 else _shard_names(prefix, world_size, weight_map.values())
    unknown_files = set(weight_map.values()) - shard_files
    if unknown_files:
        raise fields.fail('"weight_map"', f"names files outside this checkpoint: {sorted(unknown_files)[:3]}")
    raw_checksums = fields.obj(metadata.get("checksums"), '"checksums"')
    checksums = _piece_entries(fields, raw_checksums, pieces, '"checksums"', partial, digits=16)
    total_size = fields.integer(metadata.get("total_size"), '"total_size"')
    stored_bytes = sum(layout.nbytes for layout in tensors.values())
    if kind != "manifest" and not partial and total_size != stored_bytes:
        raise fields.fail('"total_size"', f"is {total_size} but the tensors hold {stored_bytes} bytes")
    pages: dict[str, str] = {}
    if version >= 2:
        piece_bytes = {name: math.prod(shape) * dtype.itemsize for name, (dtype, shape) in pieces.items()}
        _check_file_sizes(fields, files, weight_map, piece_bytes)
        pages = _parse_pages(fields, metadata, piece_bytes, page_bytes, partial)
    objects = {
        name: _parse_object(fields, name, value)
        for name, value in fields.obj(metadata.get("objects"), '"objects"').items()
    }
    containers = {
        name: _parse_container(fields, name, container_kind)
        for name, container_kind in fields.obj(metadata.get("containers"), '"containers"').items()
    }
    if kind == "part" and (objects or containers):
        raise fields.fail('"objects"', "a part holds tensor entries only (the manifest holds the values)")
    if kind == "index" and not partial:
        _check_tree(fields, tensors, objects, containers)
    return CheckpointIndex(
        directory=path.parent,
        prefix=prefix,
        world_size=world_size,
        total_size=total_size,
        weight_map=weight_map,
        tensors=tensors,
        checksums=checksums,
        objects=objects,
        containers=containers,
        user_metadata=fields.obj(metadata.get("user"), '"user"'),
        format_version=version,
        save_id=save_id,
        page_bytes=page_bytes,
        pages=pages,
        files=files,
    )


def _check_digest(fields: Fields, top: dict[str, object], metadata: dict[str, object], text: bytes | None) -> None:
    recorded = fields.hex(metadata.get("index_digest"), '"index_digest"', 32)
    if text is not None and sealed_digest(text) == recorded:
        return  # ``seal``'s layout: the digest is of the rest of the text, read as it is
    content = {key: value for key, value in top.items() if key != "metadata"}
    content["metadata"] = {key: value for key, value in metadata.items() if key != "index_digest"}
    try:
        actual = index_digest(content)
    except (ValueError, RecursionError) as error:
        raise fields.fail('"index_digest"', f"the content cannot be hashed ({error})") from None
    if actual != recorded:
        raise fields.fail(
            '"index_digest"',
            f"the index content hashes to {actual} but records {recorded}: the index was modified or damaged",
        )


def _shard_names(prefix: str, world_size: int, wanted: Iterable[str]) -> set[str]:
    """The names among ``wanted`` that are shard files of a ``world_size``-rank checkpoint, found
    without listing all ``world_size`` names."""
    marker = f"-of-{world_size:05d}.safetensors"
    found: set[str] = set()
    for name in set(wanted):
        rank_text = name[len(prefix) + 1 : -len(marker)] if name.startswith(prefix + "-") and name.endswith(marker) else ""
        if rank_text.isdigit() and rank_text.isascii() and 1 <= int(rank_text) <= world_size and f"{int(rank_text):05d}" == rank_text:
            found.add(name)
    return found


def _check_world_size_v1(fields: Fields, directory: Path, world_size: int) -> None:
    """Version 1 records no file list: a world size cannot exceed the files in the directory."""
    try:
        entries = sum(1 for _ in os.scandir(directory))
    except OSError as error:
        raise fields.fail('"world_size"', f"cannot list {directory}: {error.strerror or error}") from None
    if world_size > entries:
        raise fields.fail('"world_size"', f"is {world_size} but {directory} holds only {entries} files")


def _parse_files(fields: Fields, metadata: dict[str, object], prefix: str, world_size: int) -> dict[str, FileRecord]:
    raw = fields.obj(metadata.get("files"), '"files"')
    if len(raw) != world_size or _shard_names(prefix, world_size, raw) != set(raw):
        raise fields.fail('"files"', f"must list exactly the {world_size} shard files of {world_size} ranks")
    files: dict[str, FileRecord] = {}
    for name, entry in raw.items():
        record = fields.obj(entry, f'"files" {name!r}')
        files[name] = FileRecord(
            fields.integer(record.get("size"), f'"files" {name!r} "size"', minimum=8),
            fields.hex(record.get("header_digest"), f'"files" {name!r} "header_digest"', 16),
        )
    return files


def _parse_layouts(fields: Fields, raw_tensors: dict[str, object], check_names: bool) -> dict[str, TensorLayout]:
    """``_parse_layout`` of every entry, the lazily decoded ones decoded in one call (an index
    holds thousands)."""
    typed = _decoded_together(_LAYOUTS, list(raw_tensors.values())) or [None] * len(raw_tensors)
    return {name: _parse_layout(fields, name, entry, check_names, stored) for (name, entry), stored in zip(raw_tensors.items(), typed)}


def _parse_layout(
    fields: Fields, name: str, entry: object, check_name: bool = True, typed: _StoredLayout | None = None
) -> TensorLayout:
    """One ``tensors`` entry, checked; ``typed`` is ``entry`` already decoded, if it was."""
    where = '"tensors" ' + name
    if check_name:
        fields.name(name, where)
    if typed is None:
        typed = _typed(_LAYOUT, entry)
    if typed is not None:
        dtype_name: object = typed.dtype
        shape = tuple(typed.shape)
        raw_chunks = typed.chunks
        stored_chunks = [(c.name, tuple(c.offsets), tuple(c.shape)) for c in raw_chunks] if isinstance(raw_chunks, list) else None
    else:
        layout = fields.obj(fields.decoded(entry, where), where)
        dtype_name = layout.get("dtype")
        shape = fields.dims(layout.get("shape"), f'{where} "shape"')
        stored_chunks = None if "chunks" not in layout else _chunk_fields(fields, where, layout["chunks"])
    if not isinstance(dtype_name, str) or dtype_name not in NAME_TO_DTYPE:
        raise fields.fail(f"{where} \"dtype\"", f"unknown dtype {_short(dtype_name)}")
    if stored_chunks is None:
        return whole_layout(shape, NAME_TO_DTYPE[dtype_name])
    chunks: list[ChunkLayout] = []
    for chunk_field, offsets, chunk_shape in stored_chunks:
        if chunk_field != chunk_name(name, offsets):
            raise fields.fail(f'{where} "chunks" "name"', f"must be {chunk_name(name, offsets)!r}, got {_short(chunk_field)}")
        chunks.append(ChunkLayout(chunk_name(name, offsets), offsets, chunk_shape))
    problem = tiling_problem(shape, [(c.offsets, c.shape) for c in chunks])
    if problem is not None:
        raise fields.fail(f'{where} "chunks"', f"do not tile the {list(shape)} tensor exactly: {problem}")
    return TensorLayout(shape, NAME_TO_DTYPE[dtype_name], tuple(chunks))


def _chunk_fields(fields: Fields, where: str, raw_chunks: object) -> list[tuple[object, tuple[int, ...], tuple[int, ...]]]:
    """The (name, offsets, shape) of each chunk of a layout, type-checked field by field."""
    if not isinstance(raw_chunks, list):
        raise fields.fail(f'{where} "chunks"', f"expected a list, got {_short(raw_chunks)}")
    chunk_where = where + ' "chunks"'
    chunks: list[tuple[object, tuple[int, ...], tuple[int, ...]]] = []
    for raw in raw_chunks:
        chunk = fields.obj(raw, chunk_where)
        offsets = fields.dims(chunk.get("offsets"), f'{chunk_where} "offsets"')
        chunks.append((chunk.get("name"), offsets, fields.dims(chunk.get("shape"), f'{chunk_where} "shape"')))
    return chunks


_Typed = TypeVar("_Typed")


def _decoded_together(decoder: "msgspec.json.Decoder[list[_Typed]]", raws: list[object]) -> list[_Typed] | None:
    """Lazily decoded entries (``index_json``, a header's) decoded in one call, as the JSON array
    they form, or None if one is not raw or does not decode that way (each is then decoded on its
    own, and the field-by-field checks say which is wrong)."""
    if not all(isinstance(raw, msgspec.Raw) for raw in raws):
        return None
    try:
        return decoder.decode(b"[" + b",".join(raws) + b"]")  # pyre-ignore[6]: each is a Raw, a buffer
    except msgspec.DecodeError:
        return None


def _typed(decoder: "msgspec.json.Decoder[_Typed]", entry: object) -> _Typed | None:
    """A lazily decoded entry (``index_json``) decoded into typed fields, or None if it is not
    one or does not decode that way (then the field-by-field checks say what is wrong)."""
    if not isinstance(entry, msgspec.Raw):
        return None
    try:
        return decoder.decode(entry)
    except msgspec.DecodeError:
        return None


def _piece_entries(
    fields: Fields, raw: dict[str, object], pieces: Collection[str], field: str, partial: bool, digits: int | None = None
) -> dict[str, str]:
    """The ``field`` entries of the stored ``pieces``, parsed: exactly theirs, or (``partial``)
    at least theirs, the others left unread. They are strings (of ``digits`` lowercase hex digits,
    if given), checked all at once; only when one is not is each checked, to name it."""
    if not partial:
        if raw.keys() != set(pieces):
            raise fields.fail(field, f'lists other stored tensors than "tensors": {_difference(raw, pieces)}')
        entries = raw
    else:
        missing = [name for name in pieces if name not in raw]
        if missing:
            raise fields.fail(field, f'lacks stored tensors that "tensors" holds: {sorted(missing)[:2]}')
        entries = {name: raw[name] for name in pieces}
    if _all_text(list(entries.values()), digits):
        return cast(dict[str, str], entries)

    def parse(value: object, where: str) -> str:
        return fields.text(value, where) if digits is None else fields.hex(value, where, digits)

    return {name: parse(value, f"{field} {name}") for name, value in entries.items()}  # raises for the first bad one


def _all_text(values: list[object], digits: int | None) -> bool:
    """Whether every value is a string (of ``digits`` lowercase hex digits, if given), checked in
    one pass over them all (an index holds thousands). For digits, the joined text must be exactly
    one ``digits``-long run per value, so no value can hold a comma and two runs."""
    if not all(type(value) is str for value in values):
        return False
    if digits is None:
        return True
    joined = ",".join(cast(list[str], values)) + ","
    return len(joined) == (digits + 1) * len(values) and re.fullmatch(f"(?:[0-9a-f]{{{digits}}},)*", joined) is not None


def _parse_pages(
    fields: Fields, metadata: dict[str, object], piece_bytes: dict[str, int], page_bytes: int, partial: bool
) -> dict[str, str]:
    raw = fields.obj(metadata.get("pages"), '"pages"')
    paged = {name for name, nbytes in piece_bytes.items() if nbytes > page_bytes}
    listed = {name for name in piece_bytes if name in raw} if partial else set(raw)
    if listed != paged:
        raise fields.fail('"pages"', f"must list exactly the stored tensors larger than one page: {_difference(listed, paged)}")
    # Kept as the concatenated text (``page_digest`` slices one out): splitting millions of
    # digests is most of the time a large state's index takes to parse.
    return {
        name: fields.hex(raw[name], f'"pages" {_short(name)}', 16 * -(-piece_bytes[name] // page_bytes))
        for name in paged
    }


def _check_file_sizes(fields: Fields, files: dict[str, FileRecord], weight_map: dict[str, str], piece_bytes: dict[str, int]) -> None:
    """The tensors mapped to a file must fit in the size the index records for it (the file's
    real size is checked against that record before anything is read from it)."""
    mapped: dict[str, int] = {}
    for name, file in weight_map.items():
        mapped[file] = mapped.get(file, 0) + piece_bytes[name]
    for file, nbytes in mapped.items():
        if nbytes + 8 > files[file].size:
            raise fields.fail(f'"files" {file!r} "size"', f"is {files[file].size} bytes but the tensors mapped to it hold {nbytes}")


def _parse_object(fields: Fields, name: str, value: object) -> object:
    where = '"objects" ' + name
    fields.name(name, where)
    return decode_value(value, lambda problem: fields.fail(where, f"{problem} (in {_short(value)})"))


def _parse_container(fields: Fields, name: str, kind: object) -> str:
    where = '"containers" ' + name
    fields.name(name, where)
    if kind not in _CONTAINER_KINDS:
        raise fields.fail(where, f"expected one of {list(_CONTAINER_KINDS)}, got {_short(kind)}")
    return str(kind)


def _check_tree(
    fields: Fields, tensors: dict[str, TensorLayout], objects: dict[str, object], containers: dict[str, str]
) -> None:
    """The leaves and containers must form one tree: no name is both a value and a container (or
    two kinds of value), and every list or tuple holds exactly the positions 0..n-1."""
    both = tensors.keys() & objects.keys()
    if both:
        raise fields.fail('"objects"', f"{_short(min(both))} is also a tensor")
    children: dict[tuple[Key, ...], set[Key]] = {}
    leaves: set[tuple[Key, ...]] = set()
    for name in [*tensors, *objects]:
        leaves.add(path := fields.name(name, "a leaf"))
        for depth in range(1, len(path) + 1):
            children.setdefault(path[: depth - 1], set()).add(path[depth - 1])
    for name, kind in containers.items():
        path = fields.name(name, '"containers"')
        if path in leaves:
            raise fields.fail('"containers"', f"{_short(name)} is both a value and a {kind}")
        for depth in range(1, len(path) + 1):
            children.setdefault(path[: depth - 1], set()).add(path[depth - 1])
    for path in leaves:
        if path in children:
            raise fields.fail('"tensors"', f"{_short(encode_key(path))} is both a value and a container")
    for name, kind in containers.items():
        if kind == "dict":
            continue
        positions = children.get(fields.name(name, '"containers"'), set())
        if any(isinstance(key, str) for key in positions) or positions != set(range(len(positions))):
            raise fields.fail('"containers"', f"the {kind} {_short(name)} must hold the positions 0..n-1")


def _difference(a: Iterable[str], b: Iterable[str]) -> str:
    a_set, b_set = set(a), set(b)
    extra, missing = sorted(a_set - b_set)[:2], sorted(b_set - a_set)[:2]
    return f"extra {extra}, missing {missing}"


def read_header(
    fd: int, path: Path, index: CheckpointIndex, rank: int, names: Collection[str] | None = None
) -> dict[str, HeaderEntry]:
    """Reads and validates the header of shard file ``rank`` of ``index``, open as ``fd``.

    Version 2: the file's size and header digest must be the ones the index records, and the
    header must name the index's save. Then every entry is type-checked and, as the safetensors
    library requires, the entries must tile the data section exactly; with ``names`` (a load's
    pieces) only those entries are kept and checked, each to lie within the data section (the
    others' bytes are not read, so their layout cannot change what the load returns).

    Returns:
        Stored name -> entry with absolute file offsets (with ``names``: those the header holds).

    Raises:
        CheckpointReplacedError: The file belongs to another save than the index (the checkpoint
            was replaced while it was read).
        CorruptCheckpointError: Truncated file, bad JSON, unknown dtype, entries that do not tile
            the data section, bytes past its end, a header the index does not describe.
    """
    try:
        return _read_header(fd, path, index, rank, names)
    except OSError as error:
        raise CheckpointReadError(f"{path}: reading the header failed: {error.strerror or error}") from None


def _read_header(fd: int, path: Path, index: CheckpointIndex, rank: int, names: Collection[str] | None) -> dict[str, HeaderEntry]:
    size = os.fstat(fd).st_size
    prefix = os.pread(fd, 8, 0)
    if len(prefix) < 8:
        raise CorruptCheckpointError(f"{path}: truncated ({size} bytes, no safetensors header)")
    (header_size,) = struct.unpack("<Q", prefix)
    if header_size > MAX_HEADER_BYTES or 8 + header_size > size:
        raise CorruptCheckpointError(
            f"{path}: header length {header_size} does not fit the file's {size} bytes (truncated?)"
        )
    raw = os.pread(fd, header_size, 8)
    if len(raw) != header_size:
        raise CorruptCheckpointError(f"{path}: truncated while reading its header")
    record = index.files.get(path.name)
    header: object = None
    matches = record is not None and size == record.size and checksum(raw) == record.header_digest
    if matches:  # exactly the bytes this save's writer wrote: entries decoded as they are read
        try:
            header = _RAW_OBJECT.decode(raw)
        except msgspec.DecodeError:
            pass
    if not isinstance(header, dict):
        header = strict_json(raw.rstrip(b" "), path, "safetensors header")
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: the safetensors header is not a JSON object")
    if record is not None and not matches:
        _raise_header_mismatch(path, header, index, size, record)
    fields = Fields(path)
    metadata = fields.decoded(header.get("__metadata__"), '"__metadata__"')
    if index.format_version >= 2 and metadata != shard_header_metadata(rank, index.world_size, index.save_id):
        raise CorruptCheckpointError(f"{path}: the header's __metadata__ {_short(metadata)} is not rank {rank}'s of this save")
    if names is None:
        return _header_entries(fields, header, 8 + header_size, size)
    return _some_header_entries(fields, header, names, 8 + header_size, size)


def _raise_header_mismatch(path: Path, header: dict[str, object], index: CheckpointIndex, size: int, record: FileRecord) -> None:
    metadata = header.get("__metadata__")
    other_save = metadata.get("distributed_shampoo.save_id") if isinstance(metadata, dict) else None
    if isinstance(other_save, str) and other_save != index.save_id:
        raise CheckpointReplacedError(
            f"{path} belongs to save {other_save}, the index read before it to save {index.save_id}: "
            f"the checkpoint at {path.parent} was replaced while loading; load it again"
        )
    if size != record.size:
        state = "truncated" if size < record.size else "has trailing bytes"
        raise CorruptCheckpointError(f"{path}: {state}: {size} bytes on disk, the index records {record.size}")
    raise CorruptCheckpointError(
        f"{path}: the header does not match the index's digest {record.header_digest}: it was modified or damaged"
    )


def _header_entry(fields: Fields, name: str, raw: object, data_start: int, typed: _StoredEntry | None = None) -> HeaderEntry:
    """One header entry, type-checked; its offsets made absolute. ``typed`` is ``raw`` already
    decoded, if it was."""
    where = "header entry " + name
    if typed is None:
        typed = _typed(_ENTRY, raw)
    if typed is not None:
        dtype_name: object = typed.dtype
        shape = tuple(typed.shape)
        begin, end = typed.data_offsets
    else:
        info = fields.obj(fields.decoded(raw, where), where)
        dtype_name = info.get("dtype")
        shape = fields.dims(info.get("shape"), f'{where} "shape"')
        offsets = fields.dims(info.get("data_offsets"), f'{where} "data_offsets"')
        if len(offsets) != 2:
            raise fields.fail(f'{where} "data_offsets"', f"expected [begin, end], got {list(offsets)}")
        begin, end = offsets
    if not isinstance(dtype_name, str) or dtype_name not in NAME_TO_DTYPE:
        raise fields.fail(where, f"unknown dtype {_short(dtype_name)}")
    dtype = NAME_TO_DTYPE[dtype_name]
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise fields.fail(
            where, f"spans {end - begin} bytes but shape {list(shape)} of {dtype_name} needs {math.prod(shape) * dtype.itemsize}"
        )
    return HeaderEntry(dtype, shape, data_start + begin, data_start + end)


def _some_header_entries(
    fields: Fields, header: dict[str, object], names: Collection[str], data_start: int, size: int
) -> dict[str, HeaderEntry]:
    present = [name for name in names if name in header and name != "__metadata__"]
    raws = [header[name] for name in present]
    typed = _decoded_together(_ENTRIES, raws) or [None] * len(present)  # a load reads thousands
    entries: dict[str, HeaderEntry] = {}
    for name, raw, stored in zip(present, raws, typed):
        entries[name] = entry = _header_entry(fields, name, raw, data_start, stored)
        if entry.end > size:
            raise CorruptCheckpointError(f"{fields.path}: truncated: {name} ends at byte {entry.end} of a {size}-byte file")
    return entries


def _header_entries(fields: Fields, header: dict[str, object], data_start: int, size: int) -> dict[str, HeaderEntry]:
    entries: dict[str, HeaderEntry] = {}
    for name, raw in header.items():
        if name != "__metadata__":
            entries[name] = _header_entry(fields, name, raw, data_start)
    position = data_start
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end, item[0])):
        if entry.begin != position:
            raise fields.fail(
                f"header entry {_short(name)}", f"data starts at {entry.begin - data_start}, expected {position - data_start}"
            )
        position = entry.end
    if position != size:
        state = "truncated" if position > size else "has trailing bytes"
        raise CorruptCheckpointError(f"{fields.path}: {state}: {size} bytes on disk, header describes {position}")
    return entries


def check_header_entry(
    path: Path, name: str, entry: HeaderEntry | None, dtype: torch.dtype, shape: tuple[int, ...]
) -> HeaderEntry:
    """Returns ``entry`` if it is the tensor the index describes.

    Raises:
        IndexMismatchError: The file lacks the tensor or stores another dtype or shape.
    """
    if entry is None or entry.dtype != dtype or entry.shape != shape:
        found = "absent" if entry is None else f"{DTYPE_TO_NAME[entry.dtype]} {list(entry.shape)}"
        raise IndexMismatchError(
            f"{path}: {name} is {found} in the file but the index says {DTYPE_TO_NAME[dtype]} {list(shape)}"
        )
    return entry


def check_header_matches(path: Path, index: CheckpointIndex, header: dict[str, HeaderEntry]) -> None:
    """Every tensor the index maps to this file is in the header as described, and no other.

    Raises:
        IndexMismatchError: Names the first disagreement.
    """
    expected = [name for name, file in index.weight_map.items() if file == path.name]
    for name in expected:
        check_header_entry(path, name, header.get(name), *index.piece_layouts[name])
    if len(header) != len(expected):
        extra = sorted(set(header) - set(expected))
        raise IndexMismatchError(f"{path}: holds tensors the index does not map to it: {extra[:3]}")
