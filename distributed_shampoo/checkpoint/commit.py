# pyre-strict
"""Atomic publication: a checkpoint becomes visible under its name only once complete.

A save writes into a hidden staging directory beside the target
(``.<name>.incomplete-<token>``), fsyncs every file and the directory, and then renames it onto
the target. An existing target (``overwrite=True``) is swapped with ``renameat2(RENAME_EXCHANGE)``
so that at every instant the name holds either the old or the new complete checkpoint.
"""

import ctypes
import errno
import os
import shutil
import uuid
from pathlib import Path

_STAGING_MARK = ".incomplete-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def new_token() -> str:
    """A fresh token naming one save's staging directory."""
    return uuid.uuid4().hex[:16]


def staging_dir(target: Path, token: str) -> Path:
    """The hidden directory a save writes into before it is published as ``target``."""
    return target.parent / f".{target.name}{_STAGING_MARK}{token}"


def fsync_dir(path: Path) -> None:
    """Makes the directory's entries (created or renamed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staging: Path, target: Path) -> None:
    """Makes the complete ``staging`` directory visible as ``target``, replacing an existing one.

    The replaced checkpoint is deleted only after the new one is in place and durable.
    """
    fsync_dir(staging)
    if not target.exists():
        os.rename(staging, target)
    elif _exchange(staging, target):
        fsync_dir(target.parent)
        shutil.rmtree(staging)  # now holds the old checkpoint
    else:
        # No atomic exchange on this filesystem: a crash between these two renames leaves the
        # old checkpoint complete under the hidden name ".<name>.replaced-<token>".
        replaced = target.parent / f".{target.name}.replaced-{new_token()}"
        os.rename(target, replaced)
        os.rename(staging, target)
        fsync_dir(target.parent)
        shutil.rmtree(replaced)
    fsync_dir(target.parent)


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swaps two paths; False where the kernel or filesystem cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(first), None, str(second))
