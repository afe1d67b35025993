"""Is the disk holding the state directory full? Asked after a write failed, so the agent says
so (and never mistakes a full disk for a damaged lease table, which it would move aside).

SQLite does not always say SQLITE_FULL: yoyo, applying the schema, turns a failed write into
"no such table" after retrying its lock row for ten seconds. So the file system is asked as well.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

# Less free space than this is a full disk for the lease table (SQLite needs a few pages for a
# write, the WAL and its index more).
MIN_FREE = 1024 * 1024


def disk_full(directory: Path) -> str | None:
    """A sentence saying the disk holding `directory` is full, or None if it has room."""
    try:
        fs = os.statvfs(directory)
    except OSError:
        return None
    # root may use the blocks reserved for it; anyone else only the available ones.
    blocks = fs.f_bfree if os.geteuid() == 0 else fs.f_bavail
    free = blocks * fs.f_frsize
    if free >= MIN_FREE and (fs.f_files == 0 or fs.f_favail > 0):
        return None
    what = "no free inodes" if fs.f_files and not fs.f_favail else f"{free // 1024} KiB free"
    return (
        f"the disk holding the state directory {directory} is full ({what}): free some space "
        "there, then start the agent again"
    )


def is_full_error(exc: BaseException) -> bool:
    """The error itself says the disk is full (SQLITE_FULL, ENOSPC, EDQUOT)."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def is_corrupt_error(exc: BaseException) -> bool:
    """The file is not a database SQLite can read: damaged, truncated, or something else."""
    return isinstance(exc, sqlite3.DatabaseError) and getattr(exc, "sqlite_errorcode", None) in (
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_NOTADB,
    )
