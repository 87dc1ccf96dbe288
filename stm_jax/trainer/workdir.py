"""The training workdir: checked before any work starts, and held by one run at a time.

Two runs writing the same checkpoints and metrics file would interleave and corrupt each other,
so a run takes an exclusive ``fcntl.flock`` on ``workdir/.lock``. The kernel drops a flock when
the holding process exits for any reason, ``kill -9`` included, so there is never a stale lock to
delete by hand. (flock is advisory and may not work across machines on some network
filesystems; the workdir is assumed to be local or on a filesystem that supports it.)
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from pathlib import Path

LOCK_NAME = ".lock"


class WorkdirError(ValueError):
    """The workdir cannot be used; the message says why and what to do."""


def prepare_workdir(path: str | Path) -> Path:
    """Creates ``path`` if missing and checks it is a writable directory; returns it resolved.

    Failing here, before data loading and compilation, beats failing at the first checkpoint.
    """
    workdir = Path(path).expanduser()
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"workdir {workdir} exists but is not a directory; pass a directory.")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WorkdirError(
            f"cannot create workdir {workdir}: {error.strerror or error}. Check that the parent "
            "folders exist as directories and are writable, or pass another path."
        ) from error
    _check_writable(workdir)
    return workdir.resolve()


def _check_writable(workdir: Path) -> None:
    """Writes one byte to an anonymous temporary file, which leaves nothing behind.

    ``os.access`` is not enough: it ignores read-only mounts on some systems and root bypasses
    permission bits, whereas an actual write tests what the run will do.
    """
    try:
        with tempfile.TemporaryFile(dir=workdir) as probe:
            probe.write(b"0")
            probe.flush()
    except OSError as error:
        raise WorkdirError(
            f"workdir {workdir} is not writable: {error.strerror or error}. Fix its permissions "
            "or pass another path."
        ) from error


class WorkdirLock:
    """Exclusive, non-blocking lock on ``workdir/.lock`` for the life of a training run.

    The holder writes ``<pid> <hostname>`` into the file so a refused run can say who holds it.
    The file itself is never deleted: unlinking a lock file lets a third process lock a fresh
    inode while the old one is still held.
    """

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Takes the lock or raises :class:`WorkdirError` naming the holder's pid."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirError(
                f"another training run holds the workdir {self.workdir} ({holder}, lock file "
                f"{self.path}). Two runs in one workdir would overwrite each other's "
                "checkpoints and metrics. Wait for that run to finish, stop it, or pass a "
                "different workdir. The lock is freed as soon as that process exits (even if it "
                "is killed), so there is no stale lock file to delete."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Clears the pid and unlocks; closing the descriptor would unlock on its own too."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _read_holder(fd: int) -> str:
    """``pid 1234 on host x`` from the lock file, or a note that the holder has not written yet."""
    fields = os.pread(fd, 256, 0).decode(errors="replace").split()
    if not fields:
        return "pid unknown: the holder has not written it yet"
    host = f" on host {fields[1]}" if len(fields) > 1 else ""
    return f"pid {fields[0]}{host}"
