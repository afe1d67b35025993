"""One process per place: an exclusive lock on a directory that names its holder.

The coordinator holds one on its SQLite data directory and the agent on its state directory. The
lock is `flock` on a file inside the directory: the kernel releases it when the process dies
(even by SIGKILL), so a stale lock never blocks a restart. The holder's pid is written into the
file after the lock is taken, so the second process can say who holds it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["DirectoryBusy", "lock_directory"]


class DirectoryBusy(Exception):
    """Another process holds the directory's lock; `pid` is its process id, when known."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


def lock_directory(path: Path, *, what: str) -> int:
    """Take the exclusive lock `path` (a file inside the directory to guard); the open file
    descriptor, to be closed to release it. `what` names the holder in the error message, e.g.
    "coordinator"."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder(fd)
        os.close(fd)
        who = f"another {what} (pid {pid})" if pid else f"another {what}"
        raise DirectoryBusy(f"{who} is running on {path.parent}", pid) from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
