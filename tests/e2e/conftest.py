"""An in-process mesh: a real coordinator (gRPC on a loopback port, SQLite in tmp_path), real
agents (their own SQLite lease tables and file enforcers) and SDK clients, in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import SecretStr

from agent import app as agent_app
from agent.config import AgentConfig, FileEnforcerConfig
from jitmesh import Client
from server.app import Coordinator, build
from server.config import CoordinatorConfig
from server.domain.models import ADMIN_GROUP, Principal
from server.domain.policy import DEV_POLICY

USERS = {"alice": ["developers"], "bob": ["sre"], "carol": ["sre"], "admin": [ADMIN_GROUP]}
JOIN_TOKEN = "jmj_test-join-token"


@dataclass
class RunningAgent:
    name: str
    state: Path
    access: Path
    stop: asyncio.Event
    task: asyncio.Task[None]

    def marker(self, subject: str, action: str) -> Path:
        return self.access / f"{subject}:{action}"

    async def shutdown(self) -> None:
        self.stop.set()
        async with asyncio.timeout(10):
            await self.task


@dataclass
class Mesh:
    root: Path
    coordinator: Coordinator
    clients: dict[str, Client] = field(default_factory=dict)
    agents: dict[str, RunningAgent] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.coordinator.port}"

    def client(self, user: str) -> Client:
        return self.clients[user]

    async def start_agent(self, name: str, env: str) -> RunningAgent:
        state = self.root / name
        access = self.root / f"{name}-access"
        access.mkdir(exist_ok=True)
        config = AgentConfig(
            coordinator=self.address,
            name=name,
            labels={"env": env},
            join_token=SecretStr(JOIN_TOKEN),
            insecure=True,
            state_dir=state,
            enforcers=(FileEnforcerConfig(directory=access),),
            backoff_base=0.05,
            backoff_cap=0.5,
            heartbeat=1.0,
        )
        stop = asyncio.Event()
        running = RunningAgent(
            name, state, access, stop, asyncio.create_task(agent_app.run(config, stop=stop))
        )
        self.agents[name] = running
        await self.wait_connected(name)
        return running

    async def wait_connected(self, name: str, connected: bool = True) -> None:
        async with asyncio.timeout(15):
            while self.coordinator.registry.connected(name) != connected:
                await asyncio.sleep(0.01)


async def wait_until(predicate: object, timeout: float = 10.0) -> None:
    """Wait for a condition (a callable returning bool, or an awaitable one) under a timeout."""
    async with asyncio.timeout(timeout):
        while True:
            result = predicate()  # type: ignore[operator]
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.01)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    config = CoordinatorConfig(data_dir=tmp_path / "coordinator", port=0, default_policy=DEV_POLICY)
    coordinator = await build(config)
    admin = Principal("admin", frozenset({ADMIN_GROUP}))
    await coordinator.fleet.create_join_token(admin, {}, None, max_uses=None, token=JOIN_TOKEN)
    for user, groups in USERS.items():
        await coordinator.identity.ensure_user(user, groups, f"jmt_test-{user}")
    runner = asyncio.create_task(coordinator.run())
    mesh = Mesh(tmp_path, coordinator)
    for user in USERS:
        mesh.clients[user] = await Client.connect(mesh.address, token=f"jmt_test-{user}")
    try:
        yield mesh
    finally:
        for running in mesh.agents.values():
            if not running.task.done():
                await running.shutdown()
        for client in mesh.clients.values():
            await client.close()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
