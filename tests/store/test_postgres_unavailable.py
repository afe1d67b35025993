"""A PostgreSQL store that cannot get a connection says so as `Unavailable` (UNAVAILABLE,
STORE_UNAVAILABLE on the wire), never an unexpected exception: found by 10,000 agents saying
Hello to two replicas at once, when psycopg_pool's PoolTimeout escaped the handlers as UNKNOWN
with a traceback per call in the log."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from server.domain.errors import Unavailable
from server.store.postgres import PostgresStore
from tests.support import postgres


async def test_no_free_connection_in_time_is_unavailable_and_changes_nothing() -> None:
    async with postgres.fresh_schema() as dsn:
        store = await PostgresStore.open(dsn, min_size=1, max_size=1, pool_timeout=0.5)
        try:
            held = asyncio.Event()
            release = asyncio.Event()

            async def hold() -> None:
                async with store.transaction():
                    held.set()
                    await release.wait()

            holder = asyncio.create_task(hold())
            await asyncio.wait_for(held.wait(), 10)
            with pytest.raises(Unavailable, match="unreachable or too busy"):
                await store.get_agent("web-1")
            with pytest.raises(Unavailable):
                async with store.transaction() as tx:
                    await tx.get_agent("web-1")
            release.set()
            await holder
            # The connection is free again: the store answers as before.
            assert await store.get_agent("web-1") is None
        finally:
            await store.close()


async def test_a_connection_lost_under_the_store_is_unavailable() -> None:
    async with postgres.fresh_schema() as dsn:
        store = await PostgresStore.open(dsn, min_size=1, max_size=1)
        try:
            # The server process behind the store's one pooled connection.
            async with store._connection() as conn:
                row = await (await conn.execute("SELECT pg_backend_pid() AS pid")).fetchone()
            assert row is not None
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
                await admin.execute("SELECT pg_terminate_backend(%s)", [row["pid"]])
            with pytest.raises(Unavailable):
                await store.get_agent("web-1")
        finally:
            await store.close()
