# pyre-strict
"""The checkpoint layer's errors: one base class, one subclass per kind of failure.

Every message names what it is about: the key, the file and what was expected.
"""


class CheckpointError(Exception):
    """Base class of every error the checkpoint layer raises."""


class InvalidArgumentError(CheckpointError, ValueError):
    """An argument cannot be used (a prefix that is not a plain file name, a bad key selection)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The directory holds no complete checkpoint (no index file)."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A checkpoint already exists where a save was asked to write without ``overwrite=True``, or
    the target of ``overwrite=True`` is not a checkpoint (another kind of file, or a directory
    holding other files), which is never replaced."""


class CorruptCheckpointError(CheckpointError):
    """A file is truncated, not a regular file, or an index or header cannot be parsed, breaks the
    schema or fails its integrity check."""


class ChecksumMismatchError(CorruptCheckpointError):
    """A stored tensor's bytes do not match the checksum recorded in the index."""


class IndexMismatchError(CorruptCheckpointError):
    """The index and a shard file disagree (a missing or extra tensor, another shape or dtype)."""


class CheckpointReplacedError(CheckpointError):
    """The checkpoint was replaced (``overwrite=True`` by another job) while it was being read:
    its files belong to different saves. Nothing was loaded; loading again reads the new one."""


class CheckpointReadError(CheckpointError, OSError):
    """A file of the checkpoint could not be opened or read (permission denied, an I/O error)."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing this rank's part of a save failed (disk full, an I/O error); ``errno`` is kept."""


class MissingShardFileError(CheckpointError, FileNotFoundError):
    """A shard file named by the index does not exist."""


class MissingKeyError(CheckpointError, KeyError):
    """The template or ``keys=`` asks for a key the checkpoint does not hold."""

    def __str__(self) -> str:
        # KeyError's own __str__ quotes the message; keep it readable.
        return str(self.args[0]) if self.args else ""


class TemplateMismatchError(CheckpointError, ValueError):
    """A template leaf cannot receive the saved one: another shape, dtype or kind of value, a
    tensor without data (meta device), a ``Partial`` DTensor, or memory shared with another leaf."""


class IncompatibleFormatError(CheckpointError):
    """The checkpoint was written in another format or a newer format version."""


class UnsupportedValueError(CheckpointError, TypeError):
    """A state dict holds a value that cannot be saved without pickling."""


class InconsistentStateError(CheckpointError):
    """Ranks disagree about the state to save (the same key with another shape, dtype, kind or
    value), or a DTensor's local data disagrees with its placements."""


class DistributedSaveError(CheckpointError):
    """Another rank failed (or died) during a collective save or load; this rank's part was
    discarded too."""


class CheckpointTimeoutError(CheckpointError, TimeoutError):
    """``CheckpointFuture.wait(timeout)`` returned before the save finished (the save goes on)."""


class AsyncSaveError(CheckpointError):
    """A background save failed with an error that is not a ``CheckpointError`` (e.g. ``OSError``);
    the original is its ``__cause__``. Also raised by a closed ``AsyncCheckpointer``."""
