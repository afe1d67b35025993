"""Schema migrations (yoyo-migrations), applied before the store opens.

yoyo is imported only when a migration is pending, and the long-running agent runs pending ones
in a short-lived child process (`migrate_isolated`): yoyo, sqlparse and the package-metadata scan
yoyo does to find its backends stay resident for the life of whatever process imports them,
about 2.5 MiB of the agent's 50 MiB budget (docs/performance.md). Whether anything is pending is
read from yoyo's own record of applied migrations with plain sqlite3.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

MIGRATIONS = Path(__file__).parent / "migrations"
# Exit codes of `python -m agent.store.migrate DB`.
_EXIT_BAD_PATH = 2
_EXIT_DATABASE = 3
CHILD_TIMEOUT = 120.0


def migrate(db_path: Path) -> int:
    """Apply the migrations `db_path` lacks; returns how many ran. Idempotent."""
    if not pending(db_path):
        return 0
    # Imported here: only a store with pending migrations needs it; `check` must start fast.
    import yoyo

    # yoyo opens "file:<path>?cache=shared" as a URI, so the path must not carry URI syntax.
    _check_path(db_path)
    with yoyo.get_backend(f"sqlite:///{db_path}") as backend, backend.lock():
        pending_ = backend.to_apply(yoyo.read_migrations(str(MIGRATIONS)))
        backend.apply_migrations(pending_)
        return len(pending_)


def migrate_isolated(db_path: Path) -> int:
    """`migrate`, with the pending migrations applied by a child process (this process never
    imports yoyo). Errors surface as in `migrate`: a database error as sqlite3.DatabaseError, a
    path yoyo cannot take as ValueError, anything else as OSError."""
    if not pending(db_path):
        return 0
    _check_path(db_path)
    try:
        done = subprocess.run(
            # -I: isolated, so neither the working directory nor PYTHON* variables can put
            # other code in front of the installed package (the agent often runs as root).
            [sys.executable, "-I", "-m", "agent.store.migrate", str(db_path)],
            capture_output=True,
            timeout=CHILD_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise OSError("schema migration timed out") from None
    if done.returncode == _EXIT_DATABASE:
        raise sqlite3.DatabaseError("schema migration failed: the database cannot be read")
    if done.returncode == _EXIT_BAD_PATH:
        raise ValueError("state directory path must not contain ?, # or %")
    if done.returncode != 0:
        raise OSError(f"schema migration failed (exit {done.returncode})")
    return int(done.stdout.decode("ascii", "replace").strip() or "0")


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


def _main(argv: list[str]) -> int:
    try:
        count = migrate(Path(argv[0]))
    except sqlite3.DatabaseError:
        return _EXIT_DATABASE
    except ValueError:
        return _EXIT_BAD_PATH
    print(count)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
