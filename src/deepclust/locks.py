"""Locks that keep runs and timings honest (``fcntl.flock``: released by the kernel when a process
dies, so a kill -9 never leaves a stale lock).

Every lock file lives in the lock directory, ``$DEEPCLUST_LOCK_DIR`` (default: the system's
temporary directory), never in a folder of the user's.

* **One writer per run directory** (:func:`claim_run_dir`): an exclusive lock on
  ``deepclust-locks/<sha256 of the directory's real path>.lock``, taken before anything of the run is
  written. The real path (symbolic links and ``..`` resolved, the missing tail of a directory not
  made yet kept as typed) makes every spelling of one ``--out`` share the lock; a path, not an inode,
  keeps it valid while the run directory itself is swapped for a rebuilt one (``--overwrite``). A
  second ``fit`` on the same ``--out`` gets one line and exits. ``deepclust-locks`` is made
  world-writable and sticky (as ``/tmp``), so the users of one machine share it; a lock file another
  user made is opened read-only (``flock`` needs no write access).
* **Machine activity** (:func:`machine_activity`, :func:`exclusive_machine`): every ``fit`` holds a
  shared lock on a machine-wide file for its duration; a benchmark takes it exclusively and refuses
  to start while any fit or other benchmark runs, since two torch processes on a small CPU slow each
  other several-fold. The file is ``deepclust-activity.lock`` in the lock directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import DataError

_EXCLUSIVE_HELD = False  # this process holds the machine exclusively (a benchmark running fits in-process)


def _open_lock(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise DataError(f"cannot write to {path.parent}: {e.strerror or e}") from None


def lock_dir() -> Path:
    return Path(os.environ.get("DEEPCLUST_LOCK_DIR") or tempfile.gettempdir())


def run_lock_path(out: Path) -> Path:
    real = os.path.realpath(Path(out).expanduser())
    return lock_dir() / "deepclust-locks" / f"{hashlib.sha256(os.fsencode(real)).hexdigest()}.lock"


def _open_run_lock(path: Path) -> tuple[int, bool]:
    """(descriptor, writable) of a run's lock file: created if need be (not through a symbolic link),
    else opened read-only when another user made it."""
    try:
        try:
            path.parent.mkdir(parents=True)
            os.chmod(path.parent, 0o1777)  # shared by every user, each removing only its own files
        except FileExistsError:
            pass
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), True
        except PermissionError:
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW), False
    except OSError as e:
        raise DataError(f"cannot write to the lock directory {path.parent}: {e.strerror or e}; "
                        "set DEEPCLUST_LOCK_DIR to a directory you can write") from None


class RunDirClaim:
    """An exclusive claim on a run directory; release with :meth:`release` (or process exit)."""

    def __init__(self, out: Path):
        self.path = run_lock_path(out)
        self.fd, writable = _open_run_lock(self.path)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise DataError(f"another deepclust process is writing to {out}; wait for it to finish "
                            "or choose another --out") from None
        if writable:  # who holds it and for what, for a person reading the lock directory
            os.ftruncate(self.fd, 0)
            os.write(self.fd, os.fsencode(f"{os.getpid()} {os.path.realpath(Path(out).expanduser())}\n"))

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def claim_run_dir(out: Path) -> RunDirClaim:
    """Claim ``out`` for this process (DataError in one line if another process holds it, or if
    the lock directory cannot be written)."""
    return RunDirClaim(out)


def activity_lock_path() -> Path:
    return lock_dir() / "deepclust-activity.lock"


@contextlib.contextmanager
def machine_activity() -> Iterator[None]:
    """Held by every fit (shared): benchmarks wait for none and refuse to start while one runs."""
    if _EXCLUSIVE_HELD:
        yield
        return
    try:
        fd = _open_lock(activity_lock_path())
    except DataError:
        yield  # an unwritable temporary directory must not stop a fit
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            print("deepclust: warning: a benchmark is running on this machine; both will be slower",
                  file=sys.stderr)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_machine(what: str = "benchmark") -> Iterator[None]:
    """For benchmarks: the machine to ourselves, or DataError at once if a fit or benchmark runs."""
    global _EXCLUSIVE_HELD
    fd = _open_lock(activity_lock_path())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataError(f"refusing to start the {what}: another deepclust fit or benchmark is running on "
                        "this machine and would distort its timings") from None
    _EXCLUSIVE_HELD = True
    try:
        yield
    finally:
        _EXCLUSIVE_HELD = False
        os.close(fd)
