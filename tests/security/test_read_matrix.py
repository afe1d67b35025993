"""Who reads what (issue 10, item 2; THREAT_MODEL.md "Who reads what"; server/domain/reads.py):
every cell of the read matrix, allowed and refused, through the real gRPC API.

Users: alice and dave (developers, requesters), bob (sre, approver of prod requests), erin
(auditors: a group the coordinator's configuration names), admin. Agents: web-1 (staging,
self-service) and db-1 (prod, needs an sre approval).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from jitmesh import Client, NotFoundError, PermissionDeniedError, types
from server.app import Coordinator, build
from server.config import CoordinatorConfig
from server.domain.models import ADMIN_GROUP, Principal
from server.domain.policy import DEV_POLICY

USERS = {
    "alice": ["developers"],
    "dave": ["developers"],
    "bob": ["sre"],
    "erin": ["auditors"],
    "admin": [ADMIN_GROUP],
}
ADMIN = Principal("admin", frozenset({ADMIN_GROUP}))
MIN = timedelta(minutes=10)


@dataclass
class World:
    coordinator: Coordinator
    clients: dict[str, Client]
    requests: dict[str, types.Request]
    grants: dict[str, types.Grant]

    def __getitem__(self, user: str) -> Client:
        return self.clients[user]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    config = CoordinatorConfig(
        data_dir=tmp_path / "coordinator",
        port=0,
        default_policy=DEV_POLICY,
        auditor_groups=("auditors",),
    )
    coordinator = await build(config)
    runner = asyncio.create_task(coordinator.run())
    try:
        for user, groups in USERS.items():
            await coordinator.identity.ensure_user(user, groups, f"jmt_matrix-{user}")
        for agent, labels in {"web-1": {"env": "staging"}, "db-1": {"env": "prod"}}.items():
            join, _ = await coordinator.fleet.create_join_token(ADMIN, labels, None)
            await coordinator.fleet.enroll(join, agent, {})
        async with contextlib.AsyncExitStack() as stack:
            clients = {
                user: await stack.enter_async_context(
                    await Client.connect(
                        f"127.0.0.1:{coordinator.port}", token=f"jmt_matrix-{user}"
                    )
                )
                for user in USERS
            }
            requests: dict[str, types.Request] = {}
            grants: dict[str, types.Grant] = {}

            async def ask(name: str, user: str, agent: str, action: str) -> None:
                request, grant = await clients[user].create_request(
                    agent=agent, action=action, duration=MIN, reason="INC-1"
                )
                requests[name] = request
                if grant is not None:
                    grants[name] = grant

            await ask("alice-staging", "alice", "web-1", "logs")  # auto: no approver
            await ask("dave-staging", "dave", "web-1", "deploy")  # auto: no approver
            await ask("alice-prod", "alice", "db-1", "deploy")  # sre reviews ...
            _, grant = await clients["bob"].approve(requests["alice-prod"].id)  # ... bob did
            assert grant is not None
            grants["alice-prod"] = grant
            await ask("dave-prod", "dave", "db-1", "restart")  # pending, sre may review
            yield World(coordinator, clients, requests, grants)
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


# Which requests (by the names above) each caller sees.
SEES_REQUESTS = {
    "alice": {"alice-staging", "alice-prod"},
    "dave": {"dave-staging", "dave-prod"},
    # Approver: what sre reviews (alice-prod, which bob reviewed; dave-prod, pending), and
    # dave's history because dave has a request bob may review now. Not alice's staging
    # request: alice has nothing pending that bob may review.
    "bob": {"alice-prod", "dave-prod", "dave-staging"},
    "erin": {"alice-staging", "dave-staging", "alice-prod", "dave-prod"},
    "admin": {"alice-staging", "dave-staging", "alice-prod", "dave-prod"},
}
SEES_GRANTS = {
    "alice": {"alice-staging", "alice-prod"},
    "dave": {"dave-staging"},
    "bob": {"alice-prod", "dave-staging"},
    "erin": {"alice-staging", "dave-staging", "alice-prod"},
    "admin": {"alice-staging", "dave-staging", "alice-prod"},
}


@pytest.mark.parametrize("user", list(USERS))
async def test_requests_and_grants_by_caller(world: World, user: str) -> None:
    client = world[user]
    names = {r.id: n for n, r in world.requests.items()}
    listed = {names[r.id] for r in await client.list_requests()}
    assert listed == SEES_REQUESTS[user]
    for name, request in world.requests.items():
        if name in SEES_REQUESTS[user]:
            assert (await client.get_request(request.id)).id == request.id
        else:
            with pytest.raises(NotFoundError, match="no such request"):
                await client.get_request(request.id)
    grant_names = {g.id: n for n, g in world.grants.items()}
    assert {grant_names[g.id] for g in await client.list_grants()} == SEES_GRANTS[user]
    for name, grant in world.grants.items():
        if name in SEES_GRANTS[user]:
            assert (await client.get_grant(grant.id)).id == grant.id
        else:
            with pytest.raises(NotFoundError, match="no such grant"):
                await client.get_grant(grant.id)
    # A filter never widens the view: alice asking for dave's requests gets none.
    by_dave = {names[r.id] for r in await client.list_requests(subject="dave")}
    assert by_dave == SEES_REQUESTS[user] & {"dave-staging", "dave-prod"}


async def test_pages_hold_only_visible_requests(world: World) -> None:
    for _ in range(3):
        await world["dave"].create_request(agent="web-1", action="logs", duration=MIN)
    await world["alice"].create_request(agent="web-1", action="restart", duration=MIN)
    # Pages of one: each page is filled from the store's pages past what alice may not see.
    seen = await world.coordinator.access.list_requests(  # type: ignore[union-attr]
        Principal("alice", frozenset({"developers"})),
        states=[],
        subject="",
        agent="",
        page_size=1,
        page_token="",
    )
    pages = [seen[0]]
    while seen[1]:
        seen = await world.coordinator.access.list_requests(  # type: ignore[union-attr]
            Principal("alice", frozenset({"developers"})),
            states=[],
            subject="",
            agent="",
            page_size=1,
            page_token=seen[1],
        )
        pages.append(seen[0])
    flat = [r for page in pages for r in page]
    assert {r.subject for r in flat} == {"alice"}
    assert len(flat) == 3


@pytest.mark.parametrize(("user", "allowed"), [
    ("alice", False), ("dave", False), ("bob", False), ("erin", True), ("admin", True),
])  # fmt: skip
async def test_the_audit_log_is_for_admins_and_auditors(
    world: World, user: str, allowed: bool
) -> None:
    client = world[user]

    async def export() -> list[dict[str, object]]:
        return [record async for record in client.export_audit()]

    for read in (client.list_audit, client.verify_audit, export):
        if allowed:
            await read()
        else:
            with pytest.raises(PermissionDeniedError, match="auditor group"):
                await read()
    tail = client.tail_audit()
    try:
        if allowed:
            assert (await anext(tail)).seq == 1
        else:
            with pytest.raises(PermissionDeniedError):
                await anext(tail)
    finally:
        await tail.aclose()


@pytest.mark.parametrize("user", ["alice", "bob", "erin"])
async def test_locks_are_listed_by_admins_only(world: World, user: str) -> None:
    await world["admin"].create_lock(subject="dave", reason="INC-9")
    with pytest.raises(PermissionDeniedError):
        await world[user].list_locks()
    assert len(await world["admin"].list_locks()) == 1


async def test_agents_and_policy_are_read_by_every_operator(world: World) -> None:
    for user in USERS:
        assert {a.name for a in await world[user].list_agents()} == {"web-1", "db-1"}
        assert (await world[user].get_policy()).version == 1


async def test_a_watch_shows_only_what_the_caller_may_see(world: World) -> None:
    with pytest.raises(NotFoundError):
        async with contextlib.aclosing(
            world["alice"].watch_requests([world.requests["dave-prod"].id])
        ) as watch:
            await anext(watch)
    hub = world.coordinator.access._hub  # type: ignore[union-attr]
    async with contextlib.aclosing(world["alice"].watch_requests()) as watch:
        first = asyncio.ensure_future(anext(watch))
        async with asyncio.timeout(10):  # until the stream is subscribed on the coordinator
            while not hub._request_watchers:
                await asyncio.sleep(0.01)
        await world["bob"].deny(world.requests["dave-prod"].id, reason="no")
        mine, _ = await world["alice"].create_request(agent="web-1", action="deploy", duration=MIN)
        async with asyncio.timeout(10):
            got = await first
    # dave's denial came first but is not alice's to see.
    assert got.id == mine.id
