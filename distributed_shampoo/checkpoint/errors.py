# pyre-strict
"""The checkpoint layer's errors: one base class, one subclass per kind of failure.

Every message names what it is about: the key, the file and what was expected.
"""


class CheckpointError(Exception):
    """Base class of every error the checkpoint layer raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The directory holds no complete checkpoint (no index file)."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A checkpoint already exists where a save was asked to write without ``overwrite=True``."""


class CorruptCheckpointError(CheckpointError):
    """A file is truncated, or an index or header cannot be parsed or is inconsistent."""


class ChecksumMismatchError(CorruptCheckpointError):
    """A stored tensor's bytes do not match the checksum recorded in the index."""


class IndexMismatchError(CorruptCheckpointError):
    """The index and a shard file disagree (a missing or extra tensor, another shape or dtype)."""


class MissingShardFileError(CheckpointError, FileNotFoundError):
    """A shard file named by the index does not exist."""


class MissingKeyError(CheckpointError, KeyError):
    """The template asks for a key the checkpoint does not hold."""

    def __str__(self) -> str:
        # KeyError's own __str__ quotes the message; keep it readable.
        return str(self.args[0]) if self.args else ""


class TemplateMismatchError(CheckpointError, ValueError):
    """A template leaf differs from the saved one in shape, dtype or kind of value."""


class IncompatibleFormatError(CheckpointError):
    """The checkpoint was written in another format or a newer format version."""


class UnsupportedValueError(CheckpointError, TypeError):
    """A state dict holds a value that cannot be saved without pickling."""


class InconsistentStateError(CheckpointError):
    """Ranks disagree about the state to save (the same key with another shape, dtype or value)."""


class DistributedSaveError(CheckpointError):
    """Another rank failed during a collective save; this rank's part was discarded too."""


class AsyncSaveError(CheckpointError):
    """A background save failed with an error that is not a ``CheckpointError`` (e.g. ``OSError``);
    the original is its ``__cause__``."""
