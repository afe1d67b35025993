"""Schema migrations (yoyo-migrations), applied before the store opens."""

from __future__ import annotations

from pathlib import Path

MIGRATIONS = Path(__file__).parent / "migrations"


def migrate(db_path: Path) -> int:
    """Apply the migrations `db_path` lacks; returns how many ran. Idempotent."""
    # Imported here: only the long-running agent migrates, `check` must start fast.
    import yoyo

    # yoyo opens "file:<path>?cache=shared" as a URI, so the path must not carry URI syntax.
    if any(c in str(db_path) for c in "?#%"):
        raise ValueError("state directory path must not contain ?, # or %")
    with yoyo.get_backend(f"sqlite:///{db_path}") as backend, backend.lock():
        pending = backend.to_apply(yoyo.read_migrations(str(MIGRATIONS)))
        backend.apply_migrations(pending)
        return len(pending)
