"""Read-only lookups for `jitmesh-agent check`: no migration, no writes, few imports."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from agent.domain.errors import StateError

from .journal import JOURNAL_NAME, read_entries

DB_NAME = "agent.db"


@dataclass(frozen=True, slots=True)
class Allowing:
    grant_id: str
    not_after_ms: int


def find_allowing(db_path: Path, subject: str, action: str, now_ms: int) -> Allowing | None:
    """The active lease with the latest end that allows `subject` to do `action` at `now_ms`.

    `now_ms` is raised to the latest instant the agent persisted, so a wall clock set back
    cannot make an ended lease look valid again. Leases ended in the revoke journal (the table
    could not take the end, `journal.py`) allow nothing; neither does a lease whose removal is
    pending (it is no longer active).
    """
    if not db_path.is_file():
        raise StateError("no lease table in the state directory")
    try:
        ended = {
            str(e.get("grant_id")) for e in read_entries(db_path.parent / JOURNAL_NAME)["ends"]
        }
    except OSError as exc:
        raise StateError(f"cannot read the revoke journal ({exc.strerror})") from None
    try:
        db = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error as exc:
        raise StateError(f"cannot open the lease table: {type(exc).__name__}") from None
    try:
        floor = db.execute("SELECT value FROM meta WHERE key = 'last_wall_ms'").fetchone()
        now_ms = max(now_ms, int(floor[0])) if floor else now_ms
        rows = db.execute(
            "SELECT grant_id, not_after_ms FROM leases WHERE state = 'active' AND subject = ? "
            "AND action = ? AND not_before_ms <= ? AND not_after_ms > ? "
            "ORDER BY not_after_ms DESC LIMIT ?",
            (subject, action, now_ms, now_ms, len(ended) + 1),
        ).fetchall()
    except (sqlite3.Error, ValueError) as exc:
        raise StateError(f"cannot read the lease table: {type(exc).__name__}") from None
    finally:
        db.close()
    for grant_id, not_after_ms in rows:
        if grant_id not in ended:
            return Allowing(grant_id, not_after_ms)
    return None
