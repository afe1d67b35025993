"""The shared statements (server/store/queries.py): the translation each store gets at import,
and every translated statement compiling against its store's migrated schema."""

from __future__ import annotations

import sqlite3
from dataclasses import fields
from pathlib import Path

import psycopg
import pytest

from server.store import queries
from server.store.postgres import migrate
from server.store.sqlite import migrate as migrate_sqlite
from tests.support import postgres


def test_postgres_marks_and_percent_signs() -> None:
    assert queries.to_postgres("SELECT a FROM t WHERE b = ? AND c IN (?, ?)") == (
        "SELECT a FROM t WHERE b = %s AND c IN (%s, %s)"
    )
    assert queries.to_postgres("SELECT 1 WHERE x LIKE 'policy:%' AND y = ?") == (
        "SELECT 1 WHERE x LIKE 'policy:%%' AND y = %s"
    )
    assert queries.to_postgres("SELECT GREATEST(a, ?)") == "SELECT GREATEST(a, %s)"


def test_a_mark_inside_a_literal_is_refused() -> None:
    with pytest.raises(ValueError, match="inside a literal"):
        queries.to_postgres("SELECT 1 WHERE x = 'why?' AND y = ?")


def test_sqlite_keeps_marks_and_spells_greatest_as_max() -> None:
    assert queries.to_sqlite("SELECT GREATEST(a, ?) WHERE b LIKE 'x%'") == (
        "SELECT MAX(a, ?) WHERE b LIKE 'x%'"
    )


def test_every_statement_is_translated_once_for_each_store() -> None:
    for f in fields(queries.Queries):
        neutral = getattr(queries.NEUTRAL, f.name)
        sqlite_sql = getattr(queries.SQLITE, f.name)
        pg_sql = getattr(queries.POSTGRES, f.name)
        assert "%s" not in neutral, f.name
        assert "GREATEST(" not in sqlite_sql, f.name
        assert "?" not in pg_sql, f.name
        assert sqlite_sql.count("?") == pg_sql.count("%s") == neutral.count("?"), f.name


def test_in_lists_per_dialect() -> None:
    sqlite_d, pg_d = queries.SQLITE_DIALECT, queries.POSTGRES_DIALECT
    assert sqlite_d.in_list("state", ["A", "B"]) == "state IN (?,?)"
    assert sqlite_d.in_list("state", ["A"], negate=True) == "state NOT IN (?)"
    assert sqlite_d.in_args(("A", "B")) == ["A", "B"]
    assert pg_d.in_list("state", ["A", "B"]) == "state = ANY(%s)"
    assert pg_d.in_list("state", ["A"], negate=True) == "NOT (state = ANY(%s))"
    assert pg_d.in_args(("A", "B")) == [["A", "B"]]


def test_chunks_per_dialect() -> None:
    ids = [str(i) for i in range(queries.SQLITE_CHUNK * 2 + 1)]
    assert [len(c) for c in queries.SQLITE_DIALECT.chunks(ids)] == [
        queries.SQLITE_CHUNK,
        queries.SQLITE_CHUNK,
        1,
    ]
    assert [len(c) for c in queries.POSTGRES_DIALECT.chunks(ids)] == [len(ids)]
    assert list(queries.SQLITE_DIALECT.chunks([])) == []
    assert list(queries.POSTGRES_DIALECT.chunks([])) == []


def test_every_sqlite_statement_compiles(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    migrate_sqlite(path)
    db = sqlite3.connect(path)
    try:
        for f in fields(queries.Queries):
            sql = getattr(queries.SQLITE, f.name)
            db.execute("EXPLAIN " + sql, [None] * sql.count("?"))
    finally:
        db.close()


async def test_every_postgres_statement_compiles() -> None:
    async with postgres.fresh_schema() as dsn:
        await migrate(dsn)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for f in fields(queries.Queries):
                sql = getattr(queries.POSTGRES, f.name)
                # EXPLAIN plans the statement (names, types) without running it.
                await conn.execute("EXPLAIN " + sql, [None] * sql.count("%s"))
