"""Schema migrations (yoyo-migrations), applied before the store opens.

yoyo is imported only when a migration is pending, and the long-running agent runs pending ones
in a short-lived child process (`migrate_isolated`): yoyo, sqlparse and the package-metadata scan
yoyo does to find its backends stay resident for the life of whatever process imports them,
about 2.5 MiB of the agent's 50 MiB budget (docs/performance.md). Whether anything is pending is
read from yoyo's own record of applied migrations with plain sqlite3.

The child never outlives the agent: it is killed when the agent stops waiting for it (SIGTERM
while migrating), and the kernel kills it when the agent dies (PR_SET_PDEATHSIG), even by
SIGKILL. Its exit status says what went wrong: a full disk and a damaged database are told
apart, because only a damaged one is moved aside.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sqlite3
import sys
from pathlib import Path

from agent.domain.errors import DiskFull, StateError, StateUnreadable

from .space import disk_full, is_corrupt_error, is_full_error

MIGRATIONS = Path(__file__).parent / "migrations"
# Exit codes of `python -m agent.store.migrate DB PARENT_PID`.
_EXIT_BAD_PATH = 2
_EXIT_CORRUPT = 3
_EXIT_FULL = 4
_EXIT_ORPHAN = 5
CHILD_TIMEOUT = 120.0
_PR_SET_PDEATHSIG = 1


def migrate(db_path: Path) -> int:
    """Apply the migrations `db_path` lacks; returns how many ran. Idempotent. The caller holds
    the state directory's lock (agent.lock), so no other process migrates this database."""
    if not pending(db_path):
        return 0
    # Imported here: only a store with pending migrations needs it; `check` must start fast.
    import yoyo

    # yoyo opens "file:<path>?cache=shared" as a URI, so the path must not carry URI syntax.
    _check_path(db_path)
    with yoyo.get_backend(f"sqlite:///{db_path}") as backend:
        # A lock row left by a migration that was killed half-way would make yoyo wait ten
        # seconds and give up, at every start: the agent's own lock already keeps others out.
        backend.break_lock()
        with backend.lock():
            pending_ = backend.to_apply(yoyo.read_migrations(str(MIGRATIONS)))
            backend.apply_migrations(pending_)
            return len(pending_)


async def migrate_isolated(db_path: Path) -> int:
    """`migrate`, with the pending migrations applied by a child process (this process never
    imports yoyo). Raises DiskFull, StateUnreadable (a damaged database), ValueError (a path
    yoyo cannot take) or StateError. Cancelling it kills the child."""
    if not pending(db_path):
        return 0
    _check_path(db_path)
    child = await asyncio.create_subprocess_exec(
        # -I: isolated, so neither the working directory nor PYTHON* variables can put other
        # code in front of the installed package (the agent often runs as root).
        sys.executable, "-I", "-m", "agent.store.migrate", str(db_path), str(os.getpid()),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(CHILD_TIMEOUT):
            out, err = await child.communicate()
    except BaseException as exc:
        # Stopped (SIGTERM) or timed out: the child goes with the wait for it.
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await asyncio.shield(child.wait())
        if isinstance(exc, TimeoutError):
            raise StateError("schema migration timed out") from None
        raise
    code = child.returncode
    if code == _EXIT_FULL:
        raise DiskFull(disk_full(db_path.parent) or f"no space left in {db_path.parent}")
    if code == _EXIT_CORRUPT:
        raise StateUnreadable("schema migration failed: the database cannot be read")
    if code == _EXIT_BAD_PATH:
        raise ValueError("state directory path must not contain ?, # or %")
    if code != 0:
        last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        raise StateError(f"schema migration failed (exit {code}): {last[0][:200]}")
    return int(out.decode("ascii", "replace").strip() or "0")


def pending(db_path: Path) -> bool:
    """Whether a migration in MIGRATIONS is not recorded as applied in `db_path` (a database
    that does not exist yet has them all pending). A file that is not a database raises
    sqlite3.DatabaseError, as opening it would."""
    if not db_path.exists():
        return True
    wanted = {p.name.removesuffix(".sql") for p in MIGRATIONS.glob("*.sql")}
    db = sqlite3.connect(db_path)
    try:
        # yoyo's record of what it applied: one row per migration id (the file name).
        known = db.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '_yoyo_migration'"
        ).fetchone()[0]
        if not known:
            return True
        applied = {row[0] for row in db.execute("SELECT migration_id FROM _yoyo_migration")}
    finally:
        db.close()
    return not wanted <= applied


def _check_path(db_path: Path) -> None:
    if any(c in str(db_path) for c in "?#%"):
        raise ValueError("state directory path must not contain ?, # or %")


def _die_with(parent: int) -> bool:
    """Ask the kernel to kill this process when its parent dies; False if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    return os.getppid() == parent


def _main(argv: list[str]) -> int:
    db_path = Path(argv[0])
    if len(argv) > 1 and not _die_with(int(argv[1])):
        return _EXIT_ORPHAN
    # A full disk first: yoyo would retry its lock row for ten seconds, then blame the lock.
    if disk_full(db_path.parent):
        return _EXIT_FULL
    try:
        count = migrate(db_path)
    except ValueError:
        return _EXIT_BAD_PATH
    except Exception as exc:
        if is_full_error(exc) or disk_full(db_path.parent):
            return _EXIT_FULL
        if is_corrupt_error(exc):
            return _EXIT_CORRUPT
        raise
    print(count)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
