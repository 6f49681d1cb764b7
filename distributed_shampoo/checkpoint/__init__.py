# pyre-strict
"""World-size independent checkpoints: per-rank safetensors files and a HF sharded index.

See ``docs/checkpoint.md`` for the guide and ``docs/checkpoint-format.md`` for the format.
"""

from distributed_shampoo.checkpoint.api import (
    check_checkpoint,
    load_checkpoint,
    read_checkpoint_index,
    save_checkpoint,
    VerificationReport,
    verify_checkpoint,
)
from distributed_shampoo.checkpoint.async_save import AsyncCheckpointer, CheckpointFuture
from distributed_shampoo.checkpoint.errors import (
    AsyncSaveError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointReplacedError,
    CheckpointTimeoutError,
    CheckpointWriteError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    DistributedSaveError,
    IncompatibleFormatError,
    InconsistentStateError,
    IndexMismatchError,
    InvalidArgumentError,
    MissingKeyError,
    MissingShardFileError,
    TemplateMismatchError,
    UnsupportedValueError,
)
from distributed_shampoo.checkpoint.format import CheckpointIndex, ChunkLayout, TensorLayout
from distributed_shampoo.checkpoint.manager import CheckpointInfo, CheckpointManager, RetentionPolicy

__all__ = [
    "AsyncCheckpointer",
    "AsyncSaveError",
    "CheckpointError",
    "CheckpointFuture",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointExistsError",
    "CheckpointIndex",
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "CheckpointReplacedError",
    "CheckpointTimeoutError",
    "CheckpointWriteError",
    "check_checkpoint",
    "ChecksumMismatchError",
    "ChunkLayout",
    "CorruptCheckpointError",
    "DistributedSaveError",
    "IncompatibleFormatError",
    "InconsistentStateError",
    "IndexMismatchError",
    "InvalidArgumentError",
    "load_checkpoint",
    "MissingKeyError",
    "MissingShardFileError",
    "read_checkpoint_index",
    "RetentionPolicy",
    "save_checkpoint",
    "TemplateMismatchError",
    "TensorLayout",
    "UnsupportedValueError",
    "VerificationReport",
    "verify_checkpoint",
]
