"""A SQLite coordinator (`dev`, no Slack endpoint) never imports the PostgreSQL store's driver
and pool, nor the HTTP server behind Slack's endpoint: together they were about a seventh of
every start's CPU (docs/performance.md, "Coordinator start"). Python lists every import of the
real process on stderr (PYTHONPROFILEIMPORTTIME), from its start to serving a call."""

from __future__ import annotations

from pathlib import Path

import pytest

from jitmesh import Client

from .procs import coordinator, free_port, read_env, wait_for, wait_healthy

pytestmark = pytest.mark.subprocess

NOT_IN_A_SQLITE_COORDINATOR = ("psycopg", "psycopg_pool", "psycopg_binary", "starlette", "uvicorn")


async def test_sqlite_coordinator_loads_no_postgresql_or_http_server(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    coord = coordinator(tmp_path / "coordinator", port)
    coord.env["PYTHONPROFILEIMPORTTIME"] = "1"
    coord.start()
    try:
        await wait_healthy(address)
        await wait_for(lambda: (tmp_path / "coordinator" / "dev.env").exists(), 20, "dev.env")
        env = read_env(tmp_path / "coordinator" / "dev.env")
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ALICE"]) as alice:
            assert await alice.list_agents() == []
    finally:
        coord.stop()
    modules = {
        line.rpartition("|")[2].strip()
        for line in coord.log.read_text().splitlines()
        if line.startswith("import time:")
    }
    assert {"grpc", "aiosqlite"} <= modules  # the listing works
    loaded = {
        m
        for m in modules
        if any(m == n or m.startswith(f"{n}.") for n in NOT_IN_A_SQLITE_COORDINATOR)
    }
    assert sorted(loaded) == []
