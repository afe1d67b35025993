"""Both stores keep the same tables and columns (rows are read by column name by one shared
mapping, server/store/rows.py). A migration added to one store's folder needs its twin in the
other's: server/store/migrations/ (SQLite) and server/store/postgres/migrations/."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg

from server.store.postgres import migrate
from server.store.sqlite import migrate as migrate_sqlite
from tests.support import postgres

# Tables only one store has, and why.
ONLY_POSTGRES = {
    "audit_head",  # the chain head row every auditing transaction locks (SQLite: one writer)
    "jitmesh_migrations",  # PostgreSQL's own migration record (SQLite: yoyo's tables)
}


def sqlite_schema(path: Path) -> dict[str, set[str]]:
    migrate_sqlite(path)
    db = sqlite3.connect(path)
    try:
        tables = [
            r[0]
            for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE '_yoyo%' AND name NOT LIKE 'yoyo%' AND name NOT LIKE 'sqlite%'"
            )
        ]
        return {t: {r[1] for r in db.execute(f"PRAGMA table_info({t})")} for t in tables}
    finally:
        db.close()


async def test_both_stores_have_the_same_tables_and_columns(tmp_path: Path) -> None:
    expected = sqlite_schema(tmp_path / "c.db")
    async with postgres.fresh_schema() as dsn:
        await migrate(dsn)
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema()"
            )
            found: dict[str, set[str]] = {}
            for table, column in await cur.fetchall():
                found.setdefault(table, set()).add(column)
    for table in ONLY_POSTGRES:
        found.pop(table, None)
    assert found == expected
