# pyre-strict
"""The on-disk contract: file names, dtype names, the index schema and safetensors headers.

``docs/checkpoint-format.md`` specifies the same thing for readers written without this code.
"""

from __future__ import annotations  # memoryview[int] annotations are not subscriptable at runtime in 3.11

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from distributed_shampoo.checkpoint.errors import (
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    IncompatibleFormatError,
    IndexMismatchError,
)

FORMAT_NAME = "distributed_shampoo.checkpoint"
FORMAT_VERSION = 1
CHECKSUM_ALGORITHM = "xxh3_64"
DEFAULT_PREFIX = "optimizer"

# The safetensors reader refuses larger headers; so do we, before allocating anything.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype names of the torch dtypes that the safetensors library itself loads.
DTYPE_TO_NAME: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.complex64: "C64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
NAME_TO_DTYPE: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_TO_NAME.items()}


def shard_file_name(prefix: str, rank: int, world_size: int) -> str:
    """``<prefix>-<rank+1:05d>-of-<world_size:05d>.safetensors`` (HF numbering is 1-based)."""
    return f"{prefix}-{rank + 1:05d}-of-{world_size:05d}.safetensors"


def shard_header_metadata(rank: int, world_size: int) -> dict[str, str]:
    """The ``__metadata__`` of a shard file's safetensors header."""
    return {
        "format": "pt",
        "distributed_shampoo.format_version": str(FORMAT_VERSION),
        "rank": str(rank),
        "world_size": str(world_size),
    }


def index_file_name(prefix: str) -> str:
    """``<prefix>.safetensors.index.json``; its presence marks a complete checkpoint."""
    return f"{prefix}.safetensors.index.json"


def chunk_name(logical_name: str, offsets: tuple[int, ...]) -> str:
    """The stored name of a chunk of a sharded tensor: ``<logical>#<offset0>,<offset1>,...``."""
    return f"{logical_name}#{','.join(map(str, offsets))}"


@dataclass(frozen=True)
class ChunkLayout:
    """One stored piece of a sharded tensor: its stored name and its box in the global tensor."""

    name: str
    offsets: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorLayout:
    """A logical tensor: its global shape and dtype, and where its bytes are stored.

    ``chunks`` is empty for a tensor stored whole under its logical name.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[ChunkLayout, ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data (its chunks tile it, so also the bytes they store)."""
        return math.prod(self.shape) * self.dtype.itemsize

    def stored_pieces(self, logical_name: str) -> tuple[ChunkLayout, ...]:
        """The stored pieces, a whole tensor being one piece at offset zero."""
        if self.chunks:
            return self.chunks
        return (ChunkLayout(logical_name, (0,) * len(self.shape), self.shape),)


@dataclass(frozen=True)
class CheckpointIndex:
    """The parsed ``<prefix>.safetensors.index.json`` of a checkpoint.

    Attributes:
        directory: The checkpoint directory.
        prefix: The file name prefix.
        world_size: The number of ranks (and shard files) that wrote it.
        total_size: Bytes of stored tensor data.
        weight_map: Stored tensor name -> shard file name.
        tensors: Logical tensor name -> layout.
        checksums: Stored tensor name -> hex digest (``CHECKSUM_ALGORITHM``).
        objects: Logical name -> non-tensor leaf value.
        containers: Key path -> ``"list"``, ``"tuple"`` or ``"dict"`` for lists, tuples and empty
            dicts, so the nesting can be rebuilt without a template.
        user_metadata: The ``metadata`` the caller passed to the save.
    """

    directory: Path
    prefix: str
    world_size: int
    total_size: int
    weight_map: dict[str, str]
    tensors: dict[str, TensorLayout]
    checksums: dict[str, str]
    objects: dict[str, object]
    containers: dict[str, str]
    user_metadata: dict[str, object]

    def shard_files(self) -> list[str]:
        """The names of all ``world_size`` shard files, rank 0's first."""
        return [shard_file_name(self.prefix, rank, self.world_size) for rank in range(self.world_size)]


def encode_object(value: object) -> object:
    """JSON form of a non-tensor leaf; non-finite floats become ``{"float": "inf"|"-inf"|"nan"}``
    because JSON has no literal for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": str(value)}
    return value


def decode_object(value: object) -> object:
    """Inverse of ``encode_object``."""
    if isinstance(value, dict):
        return float(value["float"])
    return value


def index_to_json(index: CheckpointIndex) -> str:
    """Serialises an index in the HF sharded-index layout (``metadata`` + ``weight_map``)."""
    tensors: dict[str, object] = {}
    for name, layout in index.tensors.items():
        entry: dict[str, object] = {"dtype": DTYPE_TO_NAME[layout.dtype], "shape": list(layout.shape)}
        if layout.chunks:
            entry["chunks"] = [
                {"name": c.name, "offsets": list(c.offsets), "shape": list(c.shape)} for c in layout.chunks
            ]
        tensors[name] = entry
    document = {
        "metadata": {
            "total_size": index.total_size,
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "prefix": index.prefix,
            "world_size": index.world_size,
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "tensors": tensors,
            "checksums": index.checksums,
            "objects": {name: encode_object(value) for name, value in index.objects.items()},
            "containers": index.containers,
            "user": index.user_metadata,
        },
        "weight_map": index.weight_map,
    }
    # Compact: with ``indent`` json falls back to its pure-Python encoder (~20 us per tensor).
    return json.dumps(document, separators=(",", ":"), allow_nan=False) + "\n"


def find_index_file(directory: Path) -> Path:
    """Returns the only ``*.safetensors.index.json`` in ``directory``.

    Raises:
        CheckpointNotFoundError: If there is none (the directory is missing or was never
            completed), or if there are several.
    """
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"no checkpoint at {directory}: not a directory")
    candidates = sorted(directory.glob("*.safetensors.index.json"))
    if len(candidates) != 1:
        what = "no index file" if not candidates else f"several index files {[c.name for c in candidates]}"
        raise CheckpointNotFoundError(f"no complete checkpoint in {directory}: {what}")
    return candidates[0]


def read_index(directory: str | os.PathLike[str]) -> CheckpointIndex:
    """Reads and validates the index of the checkpoint in ``directory``.

    Raises:
        CheckpointNotFoundError: No complete checkpoint there.
        IncompatibleFormatError: Another format, or a newer format version.
        CorruptCheckpointError: The index is not valid JSON or breaks the schema; the message
            names the file and the field.
    """
    path = find_index_file(Path(directory))
    try:
        document = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptCheckpointError(f"{path}: not a valid JSON index ({error})") from None
    return _parse_index(path, document)


def _parse_index(path: Path, document: object) -> CheckpointIndex:
    def fail(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path}: {what}")

    if not isinstance(document, dict) or not isinstance(document.get("weight_map"), dict):
        raise fail('expected an object with "weight_map" and "metadata"')
    metadata = document.get("metadata")
    if not isinstance(metadata, dict):
        raise fail('missing "metadata" object')
    if metadata.get("format") != FORMAT_NAME:
        raise IncompatibleFormatError(
            f"{path}: format {metadata.get('format')!r} is not {FORMAT_NAME!r}; "
            "this is not a distributed_shampoo checkpoint"
        )
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise IncompatibleFormatError(
            f"{path}: format_version {version!r} is not supported (this library reads 1..{FORMAT_VERSION})"
        )
    if metadata.get("checksum_algorithm") != CHECKSUM_ALGORITHM:
        raise IncompatibleFormatError(
            f"{path}: checksum_algorithm {metadata.get('checksum_algorithm')!r} is not {CHECKSUM_ALGORITHM!r}"
        )
    try:
        tensors = {name: _parse_layout(entry) for name, entry in metadata["tensors"].items()}
        index = CheckpointIndex(
            directory=path.parent,
            prefix=str(metadata["prefix"]),
            world_size=int(metadata["world_size"]),
            total_size=int(metadata["total_size"]),
            weight_map={str(k): str(v) for k, v in document["weight_map"].items()},
            tensors=tensors,
            checksums={str(k): str(v) for k, v in metadata["checksums"].items()},
            objects={str(k): decode_object(v) for k, v in metadata["objects"].items()},
            containers={str(k): str(v) for k, v in metadata["containers"].items()},
            user_metadata=dict(metadata["user"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise fail(f"index breaks the schema ({type(error).__name__}: {error})") from None
    if index.world_size < 1 or path.name != index_file_name(index.prefix):
        raise fail(f"world_size {index.world_size} or prefix {index.prefix!r} does not match the file name")
    expected_files = set(index.shard_files())
    stored_names = {piece.name for name, layout in tensors.items() for piece in layout.stored_pieces(name)}
    if set(index.weight_map) != stored_names or set(index.checksums) != stored_names:
        raise fail('"weight_map", "checksums" and "tensors" list different stored tensors')
    unknown_files = set(index.weight_map.values()) - expected_files
    if unknown_files:
        raise fail(f"weight_map names files outside this checkpoint: {sorted(unknown_files)}")
    return index


def _parse_layout(entry: dict[str, object]) -> TensorLayout:
    dtype_name = entry["dtype"]
    if dtype_name not in NAME_TO_DTYPE:
        raise ValueError(f"unknown dtype {dtype_name!r}")
    chunks = entry.get("chunks", [])
    assert isinstance(chunks, list)
    raw_shape = entry["shape"]
    assert isinstance(raw_shape, list)
    shape = tuple(int(d) for d in raw_shape)
    return TensorLayout(
        shape=shape,
        dtype=NAME_TO_DTYPE[str(dtype_name)],
        chunks=tuple(
            ChunkLayout(
                name=str(c["name"]),
                offsets=tuple(int(o) for o in c["offsets"]),
                shape=tuple(int(d) for d in c["shape"]),
            )
            for c in chunks
        ),
    )


@dataclass(frozen=True)
class HeaderEntry:
    """A tensor in a safetensors file: dtype, shape and absolute byte range in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


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


def checksum(data: memoryview[int] | bytes) -> str:
    """The index's checksum of a stored tensor: xxh3_64 of its bytes, 16 hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


def check_checksum(path: Path, name: str, data: memoryview[int], expected: str) -> None:
    """Raises ``ChecksumMismatchError`` unless ``data`` (the stored bytes of ``name``) hashes to
    ``expected``."""
    actual = checksum(data)
    if actual != expected:
        raise ChecksumMismatchError(
            f"{path}: {name} has checksum {actual}, the index records {expected} (corrupted data)"
        )


def read_header(fd: int, path: Path) -> dict[str, HeaderEntry]:
    """Reads and validates the header of the safetensors file open as ``fd`` (named ``path`` in
    messages), with the same rules as the safetensors library.

    Returns:
        Stored name -> entry with absolute file offsets.

    Raises:
        CorruptCheckpointError: Truncated file, bad JSON, unknown dtype, entries that do not tile
            the data section, or bytes past its end.
    """
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
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptCheckpointError(f"{path}: safetensors header is not valid JSON ({error})") from None
    data_start = 8 + header_size
    entries: dict[str, HeaderEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = NAME_TO_DTYPE[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptCheckpointError(f"{path}: bad header entry for {name!r} ({error!r})") from None
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CorruptCheckpointError(
                f"{path}: {name!r} spans {end - begin} bytes but shape {shape} of {dtype} needs "
                f"{math.prod(shape) * dtype.itemsize}"
            )
        entries[name] = HeaderEntry(dtype, shape, data_start + begin, data_start + end)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise CorruptCheckpointError(f"{path}: data of {name!r} starts at {begin}, expected {position}")
        position = end
    if data_start + position != size:
        state = "truncated" if data_start + position > size else "has trailing bytes"
        raise CorruptCheckpointError(
            f"{path}: {state}: {size} bytes on disk, header describes {data_start + position}"
        )
    return entries
