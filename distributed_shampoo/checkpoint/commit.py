# pyre-strict
"""Atomic publication: a checkpoint becomes visible under its name only once complete.

A save writes into a hidden staging directory beside the target
(``.<name>.incomplete-<token>``), fsyncs every file and the directory, and then renames it onto
the target:

- ``overwrite=False``: ``renameat2(RENAME_NOREPLACE)`` creates the target only if it is absent,
  so of two racing saves exactly one wins. Where the filesystem lacks it, ``mkdir`` of the target
  is the atomic claim and the rename replaces that empty directory.
- ``overwrite=True``: only a checkpoint (a directory holding nothing but index and shard files)
  is replaced, with ``renameat2(RENAME_EXCHANGE)`` so the name always holds the old or the new
  checkpoint. Without it, the old one is first renamed to ``.<name>.replaced-<token>``;
  ``recover_interrupted_publish`` puts it back if a crash came before the second rename.
"""

import ctypes
import errno
import os
import re
import shutil
import stat
import uuid
import warnings
from pathlib import Path

import xxhash

from distributed_shampoo.checkpoint.errors import CheckpointExistsError, InvalidArgumentError
from distributed_shampoo.checkpoint.format import NAME_MAX

_STAGING_MARK = ".incomplete-"
_REPLACED_MARK = ".replaced-"
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_UNSUPPORTED: tuple[int, ...] = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP)
# The files a checkpoint directory may hold (of any prefix): only such a directory is replaced.
_CHECKPOINT_FILE: re.Pattern[str] = re.compile(
    r"[^/]+(\.safetensors\.index\.json|-\d{5,}-of-\d{5,}\.safetensors|\.manifest\.json|\.lookup\.bin|\.part-\d{5,}-of-\d{5,}\.json)"
)
# Hidden sibling names are ".<stem><mark><16 hex>": the stem keeps them within NAME_MAX.
_STEM_BYTES = 200


def new_save_id() -> str:
    """A fresh identity of one save (32 hex digits); its first 16 name the staging directory."""
    return uuid.uuid4().hex


def new_token() -> str:
    """A fresh 16-hex-digit token for a hidden name."""
    return new_save_id()[:16]


def _stem(name: str) -> str:
    """``name`` as it appears in its hidden siblings' names: itself, or for a long name a prefix
    and a digest of the whole, so that ``.<stem>.incomplete-<token>`` fits in NAME_MAX."""
    if len(os.fsencode(name)) <= _STEM_BYTES:
        return name
    head = name
    while len(os.fsencode(head)) > _STEM_BYTES - 17:
        head = head[:-1]
    return f"{head}~{xxhash.xxh3_64_hexdigest(name.encode('utf-8', 'surrogateescape'))}"


def check_target_name(target: Path) -> None:
    """Raises ``InvalidArgumentError`` if ``target``'s name cannot be a directory name."""
    if not target.name or target.name in (".", "..") or len(os.fsencode(target.name)) > NAME_MAX:
        raise InvalidArgumentError(f"{target}: the checkpoint directory's name must be 1 to {NAME_MAX} bytes")


def staging_dir(target: Path, token: str) -> Path:
    """The hidden directory a save writes into before it is published as ``target``."""
    return target.parent / f".{_stem(target.name)}{_STAGING_MARK}{token}"


def replaced_dir(target: Path, token: str) -> Path:
    """Where the fallback publish parks the checkpoint it replaces (same token as the staging)."""
    return target.parent / f".{_stem(target.name)}{_REPLACED_MARK}{token}"


def fsync_dir(path: Path) -> None:
    """Makes the directory's entries (created or renamed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_replaceable(target: Path) -> None:
    """Raises ``CheckpointExistsError`` unless ``target`` is absent, an empty directory, or a
    checkpoint directory: one holding only regular files named like an index or shard file.

    ``overwrite=True`` replaces only these: a directory of other files, a regular file, a
    symlink or a FIFO at the target is never touched.
    """
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        kind = "symbolic link" if stat.S_ISLNK(mode) else "regular file" if stat.S_ISREG(mode) else "special file"
        raise CheckpointExistsError(f"{target} is a {kind}, not a checkpoint; overwrite=True replaces only checkpoints")
    foreign = sorted(
        entry.name
        for entry in os.scandir(target)
        if not (_CHECKPOINT_FILE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False))
    )
    if foreign:
        raise CheckpointExistsError(
            f"{target} holds files that are not part of a checkpoint ({', '.join(foreign[:3])}"
            f"{' and more' if len(foreign) > 3 else ''}); overwrite=True replaces only checkpoints"
        )


def publish(staging: Path, target: Path, token: str, overwrite: bool) -> None:
    """Makes the complete ``staging`` directory visible as ``target``.

    Args:
        staging: The complete, fsynced staging directory.
        target: The checkpoint's name.
        token: The staging directory's token (names the fallback's parked copy).
        overwrite: Replace an existing checkpoint (``check_replaceable``); otherwise the target
            must not exist.

    Raises:
        CheckpointExistsError: ``overwrite`` is false and the target exists (another save won),
            or the target is not a checkpoint.
        OSError: A rename failed; nothing was published.
    """
    fsync_dir(staging)
    if not overwrite or not os.path.lexists(target):
        if not _create(staging, target):
            raise CheckpointExistsError(f"{target} appeared while saving; the new checkpoint was discarded")
        _after_publish(target, None)
        return
    check_replaceable(target)
    if _renameat2(staging, target, _RENAME_EXCHANGE):
        _after_publish(target, staging)  # the staging name now holds the old checkpoint
        return
    replaced = replaced_dir(target, token)
    os.rename(target, replaced)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(replaced, target)  # put the old checkpoint back; a crash here leaves it parked
        raise
    _after_publish(target, replaced)


def _after_publish(target: Path, replaced: Path | None) -> None:
    """Makes the new name durable and deletes the replaced checkpoint. The checkpoint is published
    already, so a failure here is a warning, never a failed save."""
    try:
        fsync_dir(target.parent)
    except OSError as error:
        warnings.warn(f"{target} is published, but syncing its parent directory failed: {error}", stacklevel=3)
    if replaced is not None:
        _remove_quietly(replaced, "the replaced checkpoint")


def _create(staging: Path, target: Path) -> bool:
    """Renames ``staging`` to ``target`` if the target does not exist; False if it does."""
    try:
        if _renameat2(staging, target, _RENAME_NOREPLACE):
            return True
        os.mkdir(target)  # the atomic claim where RENAME_NOREPLACE is missing
    except FileExistsError:
        return False
    os.rename(staging, target)  # replaces the empty directory this save created
    return True


def _renameat2(first: Path, second: Path, flags: int) -> bool:
    """``renameat2(first, second, flags)``; False where the kernel or filesystem lacks it.

    Raises:
        FileExistsError: ``RENAME_NOREPLACE`` and ``second`` exists.
        OSError: Any other failure.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), flags) == 0:
        return True
    error = ctypes.get_errno()
    if error in _UNSUPPORTED:
        return False
    if error in (errno.EEXIST, errno.ENOTEMPTY):
        raise FileExistsError(error, os.strerror(error), str(second))
    raise OSError(error, os.strerror(error), str(first), None, str(second))


def _remove_quietly(path: Path, what: str) -> None:
    """Deletes ``path``; a failure is a warning: the save it cleans up after has succeeded."""
    try:
        shutil.rmtree(path)
    except OSError as error:
        warnings.warn(f"could not delete {what} at {path}: {error}", stacklevel=3)


def recover_interrupted_publish(target: Path) -> list[str]:
    """Puts back a checkpoint that a fallback publish parked and was killed before replacing it.

    A parked ``.<name>.replaced-<token>`` whose target is missing is renamed back to the target
    (the previous checkpoint, complete); one whose target exists is the leftover of a publish that
    finished, and is deleted.

    Returns:
        What was done, one sentence per parked copy (for a warning).
    """
    done: list[str] = []
    prefix = f".{_stem(target.name)}{_REPLACED_MARK}"
    try:
        parked = sorted(entry.name for entry in os.scandir(target.parent) if entry.name.startswith(prefix))
    except OSError:  # no parent directory (yet): nothing was parked
        return done
    for name in parked:
        path = target.parent / name
        if os.path.lexists(target):
            _remove_quietly(path, "a replaced checkpoint")
            done.append(f"deleted {path}, left by a publish that completed")
        else:
            os.rename(path, target)
            fsync_dir(target.parent)
            done.append(f"restored {target} from {path}, parked by a save that was interrupted")
    return done
