"""The PostgreSQL server the tests use: `JITMESH_TEST_POSTGRES_DSN` (default: the local test
database), one fresh schema per test. Where none is reachable the PostgreSQL tests are skipped
with the reason, unless `JITMESH_REQUIRE_POSTGRES=1` (set by .ci/run), where they fail."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache

import psycopg
import pytest

from server.store.postgres import with_schema

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def base_dsn() -> str:
    return os.environ.get("JITMESH_TEST_POSTGRES_DSN", DEFAULT_DSN)


@cache
def _unreachable() -> str:
    """Why the test server cannot be used ('' when it can)."""
    try:
        with psycopg.connect(base_dsn(), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    return ""


def require() -> None:
    """Skip (or, with JITMESH_REQUIRE_POSTGRES=1, fail) when the server is unreachable."""
    why = _unreachable()
    if not why:
        return
    message = (
        f"PostgreSQL at {base_dsn()} is not reachable ({why}); start it "
        "(pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start) or set "
        "JITMESH_TEST_POSTGRES_DSN"
    )
    if os.environ.get("JITMESH_REQUIRE_POSTGRES") == "1":
        pytest.fail(message + " [JITMESH_REQUIRE_POSTGRES=1]", pytrace=False)
    pytest.skip(message)


@asynccontextmanager
async def fresh_schema() -> AsyncIterator[str]:
    """A DSN whose search_path is a new, empty schema; the schema is dropped afterwards."""
    require()
    name = "jt_" + secrets.token_hex(6)
    async with await psycopg.AsyncConnection.connect(base_dsn(), autocommit=True) as conn:
        await conn.execute(f"CREATE SCHEMA {name}")
    try:
        yield with_schema(base_dsn(), name)
    finally:
        async with await psycopg.AsyncConnection.connect(base_dsn(), autocommit=True) as conn:
            await conn.execute(f"DROP SCHEMA {name} CASCADE")
