"""One writer per directory: a lock file (`DIR/.lock`) holding the holder's pid, host and start time.

Two trainers on one run directory would resume from each other's live checkpoints and interleave their
metrics; two sweeps on one folder would train the same runs twice. The lock is an `fcntl.flock` on the file
(the kernel drops it when the holder dies, however it dies), and the file's content names the holder for the
refusal message. A file left by a dead holder is taken over with a warning. The file is unlinked on release;
after taking the lock we check that the path still names the file we locked, since a holder may have
unlinked it between our open and our flock. Standard library only (the sweep driver imports no JAX).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from qwenjax.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"(started {holder.get('started', '?')})")


def prepare_directory(directory: Path, what: str) -> bool:
    """Create `directory` (and its parents) if needed; True if it was created. UserError, one line, if it is
    a file or cannot be created."""
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{what} {directory} is a file, not a directory; choose another {what}")
    if directory.is_dir():
        return False
    try:
        directory.mkdir(parents=True)
    except FileExistsError:  # made by someone else just now
        return False
    except OSError as e:  # a parent is a file, no permission, read-only file system
        raise UserError(f"cannot create {what} {directory}: {e.strerror or e}") from None
    return True


class DirLock:
    """`with DirLock(directory, "run_dir"):` holds `directory/.lock` for the block (or `acquire`/`release`).

    `what` names the directory in messages. The directory is created if missing (and removed again on
    release if it is still empty, so a run refused by validation leaves nothing behind)."""

    def __init__(self, directory: str | os.PathLike, what: str = "directory"):
        self.directory = Path(directory).expanduser()
        self.path = self.directory / LOCK_NAME
        self.what = what
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> DirLock:
        self._created = prepare_directory(self.directory, self.what)
        for _ in range(10):  # retried only when a holder unlinked the file between our open and our flock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot write the lock file {self.path}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise UserError(f"{self.directory} is in use by {describe(holder)}; wait for it or stop it"
                                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._take_over(fd)
            return self
        raise UserError(f"could not lock {self.path}: it keeps being replaced")

    def _take_over(self, fd: int) -> None:
        previous = _read(fd)
        if previous.get("pid") is not None:  # left by a holder that died without releasing it
            here = previous.get("host") == socket.gethostname()
            dead = here and isinstance(previous["pid"], int) and not _pid_alive(previous["pid"])
            reason = "no longer running" if dead else "its lock was released"
            log.warning("%s: taking over the stale lock of %s (%s)", self.directory, describe(previous), reason)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: nobody can have it in between
        finally:
            os.close(self._fd)
            self._fd = None
        if self._created:
            try:
                self.directory.rmdir()  # only if empty: nothing was written
            except OSError:
                pass

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
