"""Fixtures for the coordinator tests: a fake clock, a real SQLite store in a temporary directory,
and a real coordinator (gRPC on port 0 in the test's own event loop) with users and agents."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from jitmesh.client import Client
from jitmesh.clock import FakeClock
from server.app import Coordinator, build
from server.config import CoordinatorConfig
from server.domain.policy import DEV_POLICY
from server.store.sqlite import SqliteStore
from tests.server.helpers import ADMIN, TOKENS, USERS, Env


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "store.db")
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def coordinator(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Coordinator]:
    config = CoordinatorConfig(data_dir=tmp_path / "coordinator", port=0, default_policy=DEV_POLICY)
    built = await build(config, clock=clock)
    try:
        yield built
    finally:
        await built.stop()


@pytest.fixture
async def env(coordinator: Coordinator, clock: FakeClock) -> AsyncIterator[Env]:
    """Users alice (developers), bob and carol (sre), dave (developers), admin (admins); agents
    web-1 (env=staging) and db-1 (env=prod); an SDK client per user."""
    for name, groups in USERS.items():
        await coordinator.identity.ensure_user(name, groups, TOKENS[name])
    credentials: dict[str, str] = {}
    for agent, labels in {"web-1": {"env": "staging"}, "db-1": {"env": "prod"}}.items():
        join, _ = await coordinator.fleet.create_join_token(ADMIN, labels, None)
        _, credentials[agent] = await coordinator.fleet.enroll(join, agent, {})
    async with AsyncExitStack() as stack:
        clients: dict[str, Client] = {}
        for name in USERS:
            client = await Client.connect(
                f"127.0.0.1:{coordinator.port}", token=TOKENS[name], timeout=10.0
            )
            clients[name] = await stack.enter_async_context(client)
        yield Env(coordinator, clock, clients, credentials)
