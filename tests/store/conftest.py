"""The store contract suite's fixtures: every test here runs once per store implementation,
through the `Store` interface only (`server.domain.ports`).

`store` is a freshly migrated, empty store; `reopen` opens another store on the same database
(a restart, or on PostgreSQL a second replica) and closes it at the end of the test. PostgreSQL
runs in a schema of its own per test (tests/support/postgres.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from server.domain.ports import Store
from server.store.postgres import PostgresStore
from server.store.sqlite import SqliteStore
from tests.support import postgres

Opener = Callable[[], Awaitable[Store]]

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
async def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    opened: list[Store] = []
    async with AsyncExitStack() as stack:
        if request.param == "postgresql":
            dsn = await stack.enter_async_context(postgres.fresh_schema())

            async def open_one() -> Store:
                store = await PostgresStore.open(dsn, min_size=1, max_size=4)
                opened.append(store)
                return store
        else:

            async def open_one() -> Store:
                store = await SqliteStore.open(tmp_path / "store.db")
                opened.append(store)
                return store

        try:
            yield open_one
        finally:
            for store in opened:
                await store.close()


@pytest.fixture
async def store(reopen: Opener) -> Store:
    return await reopen()
