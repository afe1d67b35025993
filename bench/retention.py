"""Command-log retention at fleet size: a measurement (docs/operations.md, Retention).

`--agents` agents each get `--per` commands, all acknowledged; then one retention pass
(`CommandLogRetention.truncate`) truncates them, timed per write transaction (each holds the
store's one writer on SQLite, the audit head on PostgreSQL: what other writes wait for), and a
second pass, with nothing left to do, is timed too. On PostgreSQL `--vacuum` runs VACUUM ANALYZE
first (a test server may run without autovacuum; the churn of the setup bloats the tables).

    python -m bench.retention [--agents 10000] [--per 10] [--store sqlite|postgresql]
                              [--dsn postgresql://...] [--vacuum]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from jitmesh.clock import FakeClock
from server.domain.models import CommandKind
from server.domain.ports import Store, Tx
from server.domain.retention import CommandLogRetention
from server.store.postgres import PostgresStore, with_schema
from server.store.sqlite import SqliteStore

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class _Timed:
    """The store, with each `write` timed."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.times: list[float] = []

    async def write(self, work: Callable[[Tx], Awaitable[Any]]) -> Any:
        began = time.perf_counter()
        try:
            return await self.store.write(work)
        finally:
            self.times.append(time.perf_counter() - began)


async def _fill(store: Store, agents: int, per: int) -> None:
    names = [f"agent-{i}" for i in range(agents)]
    async with store.transaction() as tx:
        for name in names:
            await tx.enroll_agent(name, {}, f"hash-{name}", T0)
    for _ in range(per):
        async with store.transaction() as tx:
            seqs = await tx.append_commands([(n, CommandKind.GRANT, "g", T0) for n in names])
            await tx.ack_commands(
                [(n, seq, "APPLIED", "") for n, seq in zip(names, seqs, strict=True) if seq], T0
            )


async def _measure(store: Store, agents: int, per: int) -> dict[str, object]:
    await _fill(store, agents, per)
    return await _passes(store)


async def _passes(store: Store) -> dict[str, object]:
    timed = _Timed(store)
    # Retention calls only `write`: the timing wrapper stands in for the whole Store.
    retention = CommandLogRetention(timed, FakeClock(), timedelta(minutes=1))  # type: ignore[arg-type]
    began = time.perf_counter()
    deleted = await retention.truncate()
    total = time.perf_counter() - began
    ms = [t * 1000 for t in timed.times]
    began = time.perf_counter()
    await retention.truncate()
    idle = time.perf_counter() - began
    return {
        "commands": deleted,
        "seconds": round(total, 3),
        "transactions": len(ms),
        "median_ms": round(statistics.median(ms), 1),
        "longest_ms": round(max(ms), 1),
        "idle_pass_ms": round(idle * 1000, 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.retention")
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--per", type=int, default=10)
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("--vacuum", action="store_true")
    args = parser.parse_args()
    result: dict[str, object] = {"store": args.store, "agents": args.agents, "per": args.per}
    if args.store == "sqlite":
        with tempfile.TemporaryDirectory() as root:
            store = await SqliteStore.open(Path(root) / "bench.db")
            try:
                result |= await _measure(store, args.agents, args.per)
            finally:
                await store.close()
    else:
        schema = "bench_retention_" + secrets.token_hex(4)
        async with await psycopg.AsyncConnection.connect(args.dsn, autocommit=True) as conn:
            await conn.execute(f"CREATE SCHEMA {schema}")
        try:
            url = with_schema(args.dsn, schema)
            pg = await PostgresStore.open(url)
            try:
                await _fill(pg, args.agents, args.per)
                if args.vacuum:
                    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as c:
                        await c.execute("VACUUM ANALYZE agents")
                        await c.execute("VACUUM ANALYZE commands")
                result |= await _passes(pg) | {"vacuumed": args.vacuum}
            finally:
                await pg.close()
        finally:
            async with await psycopg.AsyncConnection.connect(args.dsn, autocommit=True) as conn:
                await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
