# pyre-strict
"""The on-disk contract: file names, dtype names, the index schema, integrity fields and the
rules a set of chunks must satisfy.

``docs/checkpoint-format.md`` specifies the same thing for readers written without this code;
``parse.py`` reads it back as hostile input.
"""

from __future__ import annotations  # memoryview[int] annotations are not subscriptable at runtime in 3.11

import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import msgspec
import torch
import xxhash

from distributed_shampoo.checkpoint.errors import ChecksumMismatchError, InvalidArgumentError
from distributed_shampoo.checkpoint.values import encode_value

FORMAT_NAME = "distributed_shampoo.checkpoint"
FORMAT_VERSION = 3
READABLE_VERSIONS: tuple[int, ...] = (1, 2, 3)
# From version 3 on, a checkpoint also holds the loader's files (``index_parts``): a manifest, a
# lookup table and one index part per shard file.
FIRST_VERSION_WITH_PARTS = 3
CHECKSUM_ALGORITHM = "xxh3_64"
DEFAULT_PREFIX = "optimizer"

# Stored tensors larger than this also get one checksum per page, so a reader that needs only
# part of a tensor (resharding) verifies the pages it touches instead of reading it whole.
PAGE_BYTES: int = 1 << 20

# The safetensors reader refuses larger headers; so do we, before allocating anything.
MAX_HEADER_BYTES = 100_000_000
# An index larger than this is refused before it is read (a 70B-parameter state needs ~1/10 of it).
MAX_INDEX_BYTES: int = 256 << 20

# Longest file name most filesystems allow (Linux NAME_MAX).
NAME_MAX = 255
# The longest file name a prefix makes: "<prefix>-00001-of-00004.safetensors" (29 more characters;
# world sizes of 100,000 or more add digits, checked when the names are made).
_SHARD_SUFFIX_LENGTH: int = len("-00001-of-00001.safetensors")

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


def check_prefix(prefix: object) -> str:
    """Returns ``prefix`` if it can name this checkpoint's files inside its directory.

    Raises:
        InvalidArgumentError: Not a non-empty str, holds a path separator or NUL, is ``.`` or
            ``..``, starts with a dot (hidden names are the layer's own staging names), or is so
            long that a shard file name would exceed ``NAME_MAX``.
    """
    if not isinstance(prefix, str) or not prefix:
        raise InvalidArgumentError(f"prefix must be a non-empty str, got {prefix!r}")
    if "/" in prefix or "\0" in prefix or (os.altsep and os.altsep in prefix) or prefix.startswith("."):
        raise InvalidArgumentError(
            f"prefix {prefix!r} must be a plain file name: no path separator, no NUL, no leading '.'"
        )
    if len(os.fsencode(prefix)) + _SHARD_SUFFIX_LENGTH > NAME_MAX:
        raise InvalidArgumentError(
            f"prefix {prefix[:40]!r}... is {len(prefix)} characters; shard file names must fit in "
            f"{NAME_MAX} bytes, so at most {NAME_MAX - _SHARD_SUFFIX_LENGTH} are allowed"
        )
    return prefix


def shard_file_name(prefix: str, rank: int, world_size: int) -> str:
    """``<prefix>-<rank+1:05d>-of-<world_size:05d>.safetensors`` (HF numbering is 1-based)."""
    return f"{prefix}-{rank + 1:05d}-of-{world_size:05d}.safetensors"


def shard_header_metadata(rank: int, world_size: int, save_id: str) -> dict[str, str]:
    """The ``__metadata__`` of a shard file's safetensors header; ``save_id`` ties the file to the
    index of the save that wrote it."""
    return {
        "format": "pt",
        "distributed_shampoo.format_version": str(FORMAT_VERSION),
        "distributed_shampoo.save_id": save_id,
        "rank": str(rank),
        "world_size": str(world_size),
    }


def manifest_file_name(prefix: str) -> str:
    """``<prefix>.manifest.json``: what a loader reads first (version 3)."""
    return f"{prefix}.manifest.json"


def lookup_file_name(prefix: str) -> str:
    """``<prefix>.lookup.bin``: logical name hash -> index part (version 3)."""
    return f"{prefix}.lookup.bin"


def part_file_name(prefix: str, rank: int, world_size: int) -> str:
    """``<prefix>.part-<rank+1:05d>-of-<world_size:05d>.json``: the index entries of the tensors
    whose first piece is in that rank's shard file (version 3)."""
    return f"{prefix}.part-{rank + 1:05d}-of-{world_size:05d}.json"


def name_hash(name: str) -> int:
    """The 64-bit hash of a logical tensor name in the lookup table (xxh3_64 of its UTF-8)."""
    return xxhash.xxh3_64_intdigest(name.encode())


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

    def piece_shapes(self, logical_name: str) -> list[tuple[str, tuple[int, ...]]]:
        """The stored name and shape of each stored piece (``stored_pieces`` without building them)."""
        if self.chunks:
            return [(chunk.name, chunk.shape) for chunk in self.chunks]
        return [(logical_name, self.shape)]

    def stored_pieces(self, logical_name: str) -> tuple[ChunkLayout, ...]:
        """The stored pieces, a whole tensor being one piece at offset zero."""
        if self.chunks:
            return self.chunks
        return (ChunkLayout(logical_name, (0,) * len(self.shape), self.shape),)


@functools.lru_cache(maxsize=4096)
def whole_layout(shape: tuple[int, ...], dtype: torch.dtype) -> TensorLayout:
    """The layout of a tensor stored whole, one (immutable) object per shape and dtype: a state
    holds thousands of equal blocks, and planning or parsing builds a layout for each."""
    return TensorLayout(shape, dtype)


def tiling_problem(shape: Sequence[int], boxes: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]) -> str | None:
    """Why ``boxes`` (``(offsets, shape)`` pairs) do not tile a tensor of ``shape`` exactly, or None.

    Chunks of a sharded tensor (every DTensor placement) are the cells of one grid: along each
    dimension the chunks' edges cut the tensor into intervals, and every chunk is one interval in
    every dimension. Requiring that, once per cell, is an exact tiling check in O(n log n).
    """
    if not boxes:
        return "no chunks"
    if not shape:
        return "a 0-dim tensor cannot be split into chunks"
    cuts: list[dict[int, int]] = []
    for dim, size in enumerate(shape):
        edges = sorted({offsets[dim] for offsets, _ in boxes} | {offsets[dim] + extent[dim] for offsets, extent in boxes})
        if edges[0] != 0 or edges[-1] != size:
            return f"the chunks span [{edges[0]}, {edges[-1]}) of dimension {dim}, which has {size} elements"
        cuts.append({edge: position for position, edge in enumerate(edges)})
    seen: set[tuple[int, ...]] = set()
    for offsets, extent in boxes:
        if len(offsets) != len(shape) or len(extent) != len(shape):
            return f"chunk at {list(offsets)} has {len(offsets)} offsets and {len(extent)} sizes for a {len(shape)}-dim tensor"
        cell = tuple(cuts[dim][offsets[dim]] for dim in range(len(shape)))
        if any(extent[dim] <= 0 or cuts[dim][offsets[dim] + extent[dim]] != cell[dim] + 1 for dim in range(len(shape))):
            return f"chunk at {list(offsets)} of shape {list(extent)} is empty or overlaps another chunk"
        if cell in seen:
            return f"two chunks start at {list(offsets)}"
        seen.add(cell)
    cells = math.prod(len(dim_cuts) - 1 for dim_cuts in cuts)
    if len(seen) != cells:
        return f"the chunks cover {len(seen)} of the {cells} cells their edges define: a hole"
    return None


@dataclass(frozen=True)
class FileRecord:
    """What the index records of one shard file: its size and the digest of its header bytes."""

    size: int
    header_digest: str


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
        checksums: Stored tensor name -> hex digest (``CHECKSUM_ALGORITHM``) of its bytes.
        objects: Logical name -> non-tensor leaf value.
        containers: Key path -> ``"list"``, ``"tuple"`` or ``"dict"`` for lists, tuples and empty
            dicts, so the nesting can be rebuilt without a template.
        user_metadata: The ``metadata`` the caller passed to the save.
        format_version: The version it was written in (version 1 has none of the fields below:
            they are empty).
        save_id: The identity of the save, also written in every shard file's header.
        page_bytes: The page size of ``pages``.
        pages: Stored name -> the checksums of its ``page_bytes`` pages, 16 hex digits each,
            concatenated as in the file (``page_digest`` gives one); only tensors larger than one
            page.
        files: Shard file name -> its size and header digest.
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
    format_version: int = FORMAT_VERSION
    save_id: str = ""
    page_bytes: int = PAGE_BYTES
    pages: dict[str, str] = field(default_factory=dict)
    files: dict[str, FileRecord] = field(default_factory=dict)

    @functools.cached_property
    def piece_layouts(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Stored name -> dtype and shape of every stored piece."""
        return {
            piece: (layout.dtype, shape) for name, layout in self.tensors.items() for piece, shape in layout.piece_shapes(name)
        }

    def shard_files(self) -> list[str]:
        """The names of all ``world_size`` shard files, rank 0's first."""
        return [shard_file_name(self.prefix, rank, self.world_size) for rank in range(self.world_size)]


def canonical_json(document: object) -> str:
    """The canonical text of a JSON document (sorted keys, no spaces, ASCII): what the index
    digest covers, so any change of content changes it while the layout of the file does not.

    Exactly ``json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
    allow_nan=False)``, in a fifth of its time for an index: parts made only of strings, ints,
    bools, None, lists and str-keyed dicts are encoded by msgspec, whose text for them is the same
    unless it holds non-ASCII or DEL characters (json escapes those; then json encodes the part).
    json encodes the rest (floats: the two write exponents differently).
    """
    if _plain(document):
        text = _SORTED_ENCODER.encode(document)
        if text.isascii() and b"\x7f" not in text:
            return text.decode("ascii")
    elif type(document) is dict and all(type(key) is str for key in document):
        # One float (a hyperparameter among the values) must not send the large maps beside it to json.
        return "{" + ",".join(f"{_json_text(key)}:{canonical_json(document[key])}" for key in sorted(document)) + "}"
    return _json_text(document)


_SORTED_ENCODER: msgspec.json.Encoder = msgspec.json.Encoder(order="sorted")
_PLAIN_SCALARS: frozenset[type[object]] = frozenset({str, int, bool, type(None)})


def _json_text(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _plain(node: object) -> bool:
    """Whether ``node`` holds only strings, ints, bools, None, lists and str-keyed dicts (exact
    types: a subclass may encode otherwise)."""
    pending = [node]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if type(item) is not dict:
                return False
            for key, value in item.items():
                if type(key) is not str:
                    return False
                if type(value) not in _PLAIN_SCALARS:
                    pending.append(value)
        elif isinstance(item, list):
            if type(item) is not list:
                return False
            for value in item:
                if type(value) not in _PLAIN_SCALARS:
                    pending.append(value)
        elif type(item) not in _PLAIN_SCALARS:
            return False
    return True


def index_digest(document: object) -> str:
    """xxh3_128 of ``canonical_json(document)``, 32 hex digits."""
    return xxhash.xxh3_128_hexdigest(canonical_json(document).encode())


def index_document(index: CheckpointIndex, extra: Mapping[str, object] | None = None) -> dict[str, dict[str, object]]:
    """The JSON document of an index in the HF sharded-index layout (``metadata`` +
    ``weight_map``), without its digest (``seal`` adds it and gives the text); ``extra`` adds
    metadata fields."""
    tensors: dict[str, object] = {}
    for name, layout in index.tensors.items():
        entry: dict[str, object] = {"dtype": DTYPE_TO_NAME[layout.dtype], "shape": list(layout.shape)}
        if layout.chunks:
            entry["chunks"] = [
                {"name": c.name, "offsets": list(c.offsets), "shape": list(c.shape)} for c in layout.chunks
            ]
        tensors[name] = entry
    metadata: dict[str, object] = {
        "total_size": index.total_size,
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "prefix": index.prefix,
        "world_size": index.world_size,
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "save_id": index.save_id,
        "page_bytes": index.page_bytes,
        "files": {name: {"size": f.size, "header_digest": f.header_digest} for name, f in index.files.items()},
        "tensors": tensors,
        "checksums": index.checksums,
        "pages": index.pages,
        "objects": {name: encode_value(value) for name, value in index.objects.items()},
        "containers": index.containers,
        "user": index.user_metadata,
        **(extra or {}),
    }
    weight_map: dict[str, object] = {}
    weight_map.update(index.weight_map)
    return {"metadata": metadata, "weight_map": weight_map}


_SEALED_HEAD: str = '{"metadata":{'


def seal(document: dict[str, dict[str, object]]) -> str:
    """The text of an index-shaped document (``metadata``, non-empty, and ``weight_map``) with its
    ``index_digest`` (over the rest), which is also set in ``document``."""
    document["metadata"].pop("index_digest", None)
    text = canonical_json(document)
    document["metadata"]["index_digest"] = digest = xxhash.xxh3_128_hexdigest(text.encode())
    # One encoding serves the digest and the file: the canonical text with the digest spliced in
    # as the first field of "metadata" (which sorts first), a valid JSON text of the same document.
    return f'{_SEALED_HEAD}"index_digest":"{digest}",{text[len(_SEALED_HEAD):]}\n'


_SEALED_DIGEST_HEAD: bytes = f'{_SEALED_HEAD}"index_digest":"'.encode()


def sealed_digest(text: bytes) -> str | None:
    """The digest ``text`` starts with, if ``text`` is exactly what ``seal`` writes: its layout,
    and that digest is of the rest (the canonical text); else None (another layout: check it by
    re-encoding)."""
    end = len(_SEALED_DIGEST_HEAD) + 32
    if not text.startswith(_SEALED_DIGEST_HEAD) or text[end : end + 2] != b'",':
        return None
    digest = text[len(_SEALED_DIGEST_HEAD) : end].decode("ascii", errors="replace")
    content_end = len(text)
    while content_end > end + 2 and text[content_end - 1] == 0x0A:  # b"\n"
        content_end -= 1
    state = xxhash.xxh3_128(_SEALED_HEAD.encode())
    state.update(memoryview(text)[end + 2 : content_end])  # hashed in place: an index can be 100 MiB
    return digest if state.hexdigest() == digest else None


class HeaderEntry(NamedTuple):
    """A tensor in a safetensors file: dtype, shape and absolute byte range in the file (a named
    tuple: a load makes one per piece it reads)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def page_digest(digests: str, page: int) -> str:
    """The checksum of page ``page`` in a tensor's concatenated page checksums."""
    return digests[16 * page : 16 * page + 16]


def checksum(data: memoryview[int] | bytes) -> str:
    """The index's checksum of a stored tensor: xxh3_64 of its bytes, 16 hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


def page_checksums(data: memoryview[int], whole: "xxhash.xxh3_64", page_bytes: int = PAGE_BYTES) -> list[str]:
    """The checksum of each ``page_bytes`` page of ``data`` (the last one may be shorter), feeding
    ``whole`` the same bytes on the way, so the whole checksum and the page checksums take one
    pass over memory (each page is hashed a second time from the cache)."""
    pages: list[str] = []
    for start in range(0, data.nbytes, page_bytes):
        page = data[start : start + page_bytes]
        whole.update(page)
        pages.append(checksum(page))
    return pages


def checksums_of(data: memoryview[int], page_bytes: int = PAGE_BYTES) -> tuple[str, tuple[str, ...]]:
    """A stored tensor's checksum and, if it is larger than one page, its page checksums."""
    if data.nbytes <= page_bytes:
        return checksum(data), ()
    whole = xxhash.xxh3_64()
    pages = page_checksums(data, whole, page_bytes)
    return whole.hexdigest(), tuple(pages)


def check_checksum(path: Path, name: str, actual: str, expected: str, what: str = "") -> None:
    """Raises ``ChecksumMismatchError`` unless the stored bytes of ``name`` (or the part ``what``
    of them) hash to ``expected``."""
    if actual != expected:
        raise ChecksumMismatchError(
            f"{path}: {name}{what} has checksum {actual}, the index records {expected} (corrupted data)"
        )
