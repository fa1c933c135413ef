"""Which worker runs which run of a cross-validation: a claim file per run on the shared filesystem, no
coordinator.

Several `smptrain-cv` workers (one per GPU, or the tasks of a SLURM job array) walk the same plan. A worker runs a
run only after creating its claim `{cv_dir}/claims/{run name}` with an exclusive create (`O_CREAT | O_EXCL`), which
the filesystem grants to one worker; it touches the file while it runs and removes it when the run ends. A claim
whose worker is gone (its pid no longer exists on this host, or no touch for `STALE_AFTER` seconds from another
host) is taken over by the next worker that looks: it renames the stale claim away (one rename succeeds) and claims
the run itself, which then resumes from the dead worker's last checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from pathlib import Path

CLAIMS = "claims"
TOUCH_EVERY = 30.0  # seconds between a running worker's touches of its claim
STALE_AFTER = 180.0  # a claim untouched this long belongs to a dead worker (another host's pid cannot be checked)


def me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Claim:
    """A held claim: touched every TOUCH_EVERY seconds until `release()`."""

    def __init__(self, path: Path):
        self.path, self.stop = path, threading.Event()
        self.thread = threading.Thread(target=self._touch, daemon=True, name="smptrain-claim")
        self.thread.start()

    def _touch(self) -> None:
        while not self.stop.wait(TOUCH_EVERY):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        try:
            if _owner(self.path) == me():
                self.path.unlink()
        except OSError:
            pass


def _owner(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("worker")
    except (OSError, ValueError):
        return None


def gone_from_this_host(owner: str) -> bool:
    """Whether a worker `host:pid` ran on this host and its process no longer exists (unknown elsewhere: False)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def is_stale(path: Path, owner: str | None) -> bool:
    """The claim's worker is gone: its pid is not alive on this host, or the claim has not been touched lately."""
    if gone_from_this_host(owner or ":"):
        return True
    try:
        return time.time() - path.stat().st_mtime > STALE_AFTER
    except FileNotFoundError:
        return True


def _create(path: Path) -> bool:
    try:
        handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(handle, "w") as out:
        out.write(json.dumps({"worker": me(), "since": time.time()}) + "\n")
    return True


def claim(cv_dir: Path, run_name: str) -> tuple[Claim | None, str | None]:
    """(the claim, None) when this worker may run `run_name`, else (None, the worker holding it)."""
    path = Path(cv_dir) / CLAIMS / run_name
    path.parent.mkdir(parents=True, exist_ok=True)
    if _create(path):
        return Claim(path), None
    owner = _owner(path)
    if not is_stale(path, owner):
        return None, owner
    grave = path.with_name(f".{run_name}.stale-{os.getpid()}")
    try:
        os.rename(path, grave)  # of the workers that found it stale, one renames it away
    except FileNotFoundError:
        return None, _owner(path)
    if _owner(grave) != owner:  # a worker claimed it afresh between our look and our rename: give it back
        if not path.exists():
            os.rename(grave, path)
        return None, _owner(path)
    grave.unlink(missing_ok=True)
    return (Claim(path), None) if _create(path) else (None, _owner(path))


@contextlib.contextmanager
def in_turn(cv_dir: Path):
    """Workers that tabulate the same cross-validation take turns: an advisory POSIX lock (`lockf`, which NFS and
    Lustre grant across hosts) on `{cv_dir}/.table.lock`. The one that tabulates last has read every row written
    before it, so no row is lost whoever finishes first. A filesystem without locks lets them go on unlocked."""
    import fcntl

    Path(cv_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(cv_dir) / ".table.lock", "a") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX)
            locked = True
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            locked = False
        try:
            yield
        finally:
            if locked:
                fcntl.lockf(handle, fcntl.LOCK_UN)
