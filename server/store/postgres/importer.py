"""`jitmesh-coordinator migrate-store`: copy a SQLite coordinator's database into an empty
PostgreSQL store, table by table, then check that nothing changed on the way: the same rows per
table and the same audit chain (every hash recomputed and verified, the same head).

Both schemas hold the same tables and columns (tests/store/test_schema.py), so the copy is
generic: every table both have, parents before children (foreign keys), columns by name.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from server.domain.audit import verify_chain
from server.store.sqlite import migrate as migrate_sqlite

from . import migrate

# Copied first, in this order (foreign keys); any other shared table after them, by name.
ORDER = ("meta", "users", "tokens", "agents", "requests", "reviews", "grants")
# Per-installation or per-process rows that do not move: replicas report themselves afresh, and
# the shared secrets are uploaded from the data directory (encrypted) by the caller.
# Rate buckets are a running coordinator's short memory (a SQLite one keeps them in memory).
SKIP = frozenset({"replicas", "secrets", "audit_head", "jitmesh_migrations", "rate_buckets"})
BATCH = 5000


class StoreImportError(Exception):
    """The target is not empty, or the copy does not match its source: says which."""


@dataclass
class Imported:
    rows: dict[str, int] = field(default_factory=dict)
    audit_head: tuple[int, str] = (0, "")


def _read_sqlite(path: Path) -> tuple[dict[str, list[str]], dict[str, list[tuple[Any, ...]]]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [
            r[0]
            for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%' "
                "AND name NOT LIKE '%yoyo%'"
            )
        ]
        columns = {t: [r[1] for r in db.execute(f"PRAGMA table_info({t})")] for t in names}
        rows = {t: db.execute(f"SELECT {', '.join(columns[t])} FROM {t}").fetchall() for t in names}
    finally:
        db.close()
    return columns, rows


async def import_sqlite(source: Path, dsn: str) -> Imported:
    """Copy the SQLite database at `source` into the (empty) PostgreSQL store `dsn`."""
    if not await asyncio.to_thread(source.exists):
        raise StoreImportError(f"{source} does not exist")
    await asyncio.to_thread(migrate_sqlite, source)
    await migrate(dsn)
    columns, rows = await asyncio.to_thread(_read_sqlite, source)
    done = Imported()
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
        target = {r[0] for r in await cur.fetchall()}
        for table in ("audit", "agents", "requests", "grants", "users"):
            cur = await conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table})")
            found = await cur.fetchone()
            if found is not None and found[0]:
                raise StoreImportError(
                    f"the target already holds data (table {table}); migrate-store copies into "
                    "an empty database only"
                )
        shared = [t for t in columns if t in target and t not in SKIP]
        ordered = [t for t in ORDER if t in shared] + sorted(t for t in shared if t not in ORDER)
        async with conn.transaction():
            for table in ordered:
                names = columns[table]
                sql = (
                    f"INSERT INTO {table} ({', '.join(names)}) "
                    f"VALUES ({', '.join(['%s'] * len(names))})"
                )
                data = rows[table]
                async with conn.cursor() as c:
                    for first in range(0, len(data), BATCH):
                        await c.executemany(sql, data[first : first + BATCH])
                done.rows[table] = len(data)
            if "checkpoints" in ordered:
                await conn.execute(
                    "SELECT setval(pg_get_serial_sequence('checkpoints', 'id'), "
                    "COALESCE((SELECT MAX(id) FROM checkpoints), 0) + 1, false)"
                )
            cur = await conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            head = await cur.fetchone()
            if head is not None:
                await conn.execute(
                    "UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1", [head[0], head[1]]
                )
                done.audit_head = (int(head[0]), str(head[1]))
    await _verify(source, dsn, done)
    return done


async def _verify(source: Path, dsn: str, done: Imported) -> None:
    """The copy has the source's rows per table and a chain that verifies with the same head."""
    from server.store.postgres import PostgresStore
    from server.store.sqlite import SqliteStore

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for table, count in done.rows.items():
            cur = await conn.execute(f"SELECT COUNT(*) FROM {table}")
            found = await cur.fetchone()
            if found is None or found[0] != count:
                raise StoreImportError(f"table {table}: {count} rows in the source, {found} copied")
    target = await PostgresStore.open(dsn, min_size=1, max_size=2, migrate_now=False)
    original = await SqliteStore.open(source)
    try:
        copied = await target.audit_chain(0, 100_000_000)
        # Each signed checkpoint must still name a hash of the copied chain.
        marks = {cp.seq: cp.hash for cp in await target.checkpoints() if cp.seq}
        result = verify_chain(copied, marks)
        if not result.ok:
            raise StoreImportError(
                f"the copied audit chain does not verify: {result.problem} at seq "
                f"{result.first_bad_seq}"
            )
        if await target.audit_head() != await original.audit_head():
            raise StoreImportError("the copied audit chain's head differs from the source's")
        if await target.checkpoints() != await original.checkpoints():
            raise StoreImportError("the copied signed checkpoints differ from the source's")
    finally:
        await original.close()
        await target.close()
