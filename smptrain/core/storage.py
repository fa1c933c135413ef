"""Writing when the disk says no: a full filesystem, an exceeded quota, a read-only mount or a denied permission is
one sentence naming the path and the free space (`WriteFailed`, a `UserError`: exit status 2), and what was being
written is removed, so nothing partial holds the space.

Python's own writes raise `OSError` with the reason's errno; torch's zip writer says only `basic_ios::clear:
iostream error` or `unexpected pos`, and safetensors `No space left on device` in its text, so those are read
from the message and, for torch, from the free space left at that moment.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import shutil
import threading
from pathlib import Path

from smptrain.core.errors import UserError
from smptrain.core.failpoints import failpoint

REASONS = {
    errno.ENOSPC: "no space is left on its filesystem",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "its filesystem is read-only",
    errno.EACCES: "permission is denied",
    errno.EPERM: "permission is denied",
}
# How the reasons read in the messages of libraries that do not raise OSError.
TEXTS = {"no space left on device": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT,
         "read-only file system": errno.EROFS, "permission denied": errno.EACCES}
TORCH_STREAM = ("iostream error", "unexpected pos", "PytorchStreamWriter failed")
NEARLY_FULL = 16 * 2**20  # below this much free space, torch's stream errors are taken as a full disk


class WriteFailed(UserError):
    """A file could not be written for a reason of the filesystem (space, quota, read-only, permission)."""


def human(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def free_space(path: Path) -> int:
    """Free bytes (for this user) on the filesystem holding `path`, or of its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def reason_of(error: BaseException, path: Path) -> int | None:
    """The errno of a filesystem refusal behind `error` (its cause chain included), or None for anything else."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in REASONS:
            return error.errno
        text = str(error).lower()
        for words, code in TEXTS.items():
            if words in text:
                return code
        if any(words.lower() in text for words in TORCH_STREAM) and 0 <= free_space(path) < NEARLY_FULL:
            return errno.ENOSPC
        error = error.__cause__ or error.__context__
    return None


def sentence(path: Path, code: int, needed: int | None = None, then: str = "") -> str:
    free = free_space(path)
    room = f"{human(free)} free there" if free >= 0 else "free space unknown"
    if needed:
        room += f", about {human(needed)} needed"
    return f"cannot write {path}: {REASONS[code]} ({room}){'; ' + then if then else ''}"


@contextlib.contextmanager
def writing(path, needed: int | None = None, cleanup=None, then: str = ""):
    """Turn a filesystem refusal while writing `path` into `WriteFailed`, after `cleanup()` (removing what was
    partly written). Other errors pass unchanged."""
    try:
        yield
    except WriteFailed:
        if cleanup is not None:
            cleanup()
        raise
    except Exception as error:
        code = reason_of(error, Path(path))
        if code is None:
            if cleanup is not None:
                cleanup()
            raise
        while error is not None:  # the failed writer's frames hold its open file, and with it the space
            error.__traceback__, error = None, error.__cause__ or error.__context__
        gc.collect()
        if cleanup is not None:
            cleanup()
        release_deleted(Path(path).parent)
        raise WriteFailed(sentence(Path(path), code, needed, then)) from None


def release_deleted(under: Path) -> None:
    """Give back the space of removed files below `under` that this process still holds open. torch's zip writer
    keeps its file descriptor after a failed write until the process ends; truncating the deleted file through it
    frees the blocks now (for the next run of a cross-validation, and for the free space the sentence reports)
    without closing a descriptor that torch still owns."""
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        return
    prefix = str(Path(under).absolute())
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
            if target.startswith(prefix) and target.endswith(" (deleted)"):
                os.ftruncate(int(fd.name), 0)
        except (OSError, ValueError):
            continue


def file_mode() -> int:
    """The mode a new file gets under the current umask (0644 under 022): temporaries are made 0600 by some writers
    (mkstemp, safetensors), and a job of another user on a shared cluster must read what smptrain wrote."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def replacing(path, needed: int | None = None, then: str = "", settle: bool = True):
    """Write `path` whole or not at all: the block writes the temporary this yields (a hidden name beside `path`,
    unique to this process and thread); when it ends without error the temporary gets the umask's mode and is
    renamed over `path` in one step, so a reader, a kill or a full disk sees the old file (or none) or the new one,
    never part of it. On any error the temporary is removed, and a filesystem refusal becomes `WriteFailed`.
    Every file smptrain writes goes through here (text, tables, tensors, figures; links with `settle=False`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")

    def remove() -> None:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()

    with writing(path, needed, cleanup=remove, then=then):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # not a refusal of the filesystem (those `writing` words): a file where a folder goes
            if reason_of(error, path) is not None:
                raise
            raise UserError(f"cannot write to {path.parent}: {error.strerror or error}") from None
        remove()
        yield tmp
        if settle:
            os.chmod(tmp, file_mode())
        failpoint("write.before_rename", path.name)
        os.replace(tmp, path)
        failpoint("write.after_rename", path.name)


def write_text(path, text: str) -> None:
    """Write a whole text file through `replacing`."""
    with replacing(path) as tmp:
        tmp.write_text(text)


def move(path, target) -> None:
    """Put a whole file under another name (one rename; the folder made): a file kept aside, not rewritten."""
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
