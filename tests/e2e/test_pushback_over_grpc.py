"""The coordinator's two refusals with a retry hint (issue 16), end to end over real gRPC with
real agent processes:

- admission control: agent streams beyond the admission pace are refused with
  RESOURCE_EXHAUSTED and a hint, and each refused agent process dials again no sooner than its
  hint (its own backoff schedule here is much shorter), until every agent is served;
- delivery pushback on approval: an approval whose grant command the agent would not get in
  time is refused with RESOURCE_EXHAUSTED and a hint naming the agent, the review is rolled
  back (the request stays pending, reviewable again), and once the agent caught up the same
  approval goes through and the grant is applied on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from jitmesh import Client, RateLimitedError, RequestState
from server.app import Coordinator, build
from server.config import CoordinatorConfig
from server.domain.admission import Admission
from server.domain.models import ADMIN_GROUP, Principal
from server.domain.policy import DEV_POLICY
from server.rpc.agentlink import AgentLinkServicer

from .procs import Proc, agent

pytestmark = pytest.mark.subprocess

JOIN = "jmj_pushback-join-token"
TEN_MINUTES = timedelta(minutes=10)
USERS = {"alice": ["developers"], "bob": ["sre"], "admin": [ADMIN_GROUP]}


@contextlib.asynccontextmanager
async def running(tmp: Path, **settings: Any) -> AsyncIterator[Coordinator]:
    config = CoordinatorConfig(
        data_dir=tmp / "coordinator", port=0, default_policy=DEV_POLICY, **settings
    )
    coordinator = await build(config)
    admin = Principal("admin", frozenset({ADMIN_GROUP}))
    await coordinator.fleet.create_join_token(admin, {}, None, max_uses=None, token=JOIN)
    for user, groups in USERS.items():
        await coordinator.identity.ensure_user(user, groups, f"jmt_test-{user}")
    runner = asyncio.create_task(coordinator.run())
    try:
        yield coordinator
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


def start_agent(coordinator: Coordinator, tmp: Path, name: str, env: str) -> Proc:
    access = tmp / f"{name}-access"
    access.mkdir()
    proc = agent(
        f"127.0.0.1:{coordinator.port}", name, f"env={env}", JOIN, tmp / name, access,
        "--log-level", "warning",
    )  # fmt: skip
    proc.start()
    return proc


async def until(predicate: Any, timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@dataclass
class Attempt:
    """One AgentLink.Connect call as the coordinator saw it."""

    credential: str
    at: float
    hint: float | None = None  # seconds; None: admitted


_current: contextvars.ContextVar[Attempt] = contextvars.ContextVar("attempt")


async def test_agents_refused_by_admission_wait_out_their_hint_and_all_come_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[Attempt] = []
    connect, admit = AgentLinkServicer.Connect, Admission.admit

    async def recorded_connect(self: AgentLinkServicer, requests: Any, context: Any) -> None:
        metadata = dict(context.invocation_metadata() or ())
        attempt = Attempt(str(metadata.get("authorization", "")), time.monotonic())
        attempts.append(attempt)
        _current.set(attempt)  # this call's own task: seen by `admit` below
        await connect(self, requests, context)

    def recorded_admit(self: Admission, now: float) -> float | None:
        hint = admit(self, now)
        with contextlib.suppress(LookupError):
            _current.get().hint = hint
        return hint

    monkeypatch.setattr(AgentLinkServicer, "Connect", recorded_connect)
    monkeypatch.setattr(Admission, "admit", recorded_admit)
    names = [f"web-{i}" for i in range(4)]
    # Two new streams a second, one at a time: four agents dialling together cannot all be
    # taken at once. The agents' own schedule (base 0.1 s, cap 0.5 s) is shorter than the hints.
    async with running(tmp_path, agent_admit_rate=2.0, agent_admit_burst=1) as coordinator:
        procs = [start_agent(coordinator, tmp_path, name, "staging") for name in names]
        try:
            await until(
                lambda: all(coordinator.registry.connected(n) for n in names),
                60,
                "every agent served",
            )
        finally:
            for proc in procs:
                proc.stop()
    refused = [a for a in attempts if a.hint is not None]
    assert refused, "some streams were refused by admission control"
    assert len({a.credential for a in attempts}) == len(names)
    for credential in {a.credential for a in attempts}:
        mine = [a for a in attempts if a.credential == credential]
        # The last attempt was admitted (every agent was served)...
        assert any(a.hint is None for a in mine)
        # ...and after each refusal the agent waited at least its hint before dialling again.
        for refusal, following in itertools.pairwise(mine):
            if refusal.hint is not None:
                waited = following.at - refusal.at
                assert waited >= refusal.hint - 0.005, (refusal.hint, waited)


async def test_an_approval_the_agent_would_not_get_in_time_is_pushed_back_and_rolled_back(
    tmp_path: Path,
) -> None:
    # One undelivered command at most per agent: the second approval while the agent is
    # frozen cannot be delivered in time.
    async with running(tmp_path, agent_undelivered_limit=1) as coordinator:
        address = f"127.0.0.1:{coordinator.port}"
        db = start_agent(coordinator, tmp_path, "db-1", "prod")
        alice = await Client.connect(address, token="jmt_test-alice")
        bob = await Client.connect(address, token="jmt_test-bob", pushback_wait=0)
        try:
            await until(lambda: coordinator.registry.connected("db-1"), 30, "db-1 connected")
            first, _ = await alice.create_request(
                agent="db-1", action="restart", duration=TEN_MINUTES, reason="one"
            )
            second, _ = await alice.create_request(
                agent="db-1", action="deploy", duration=TEN_MINUTES, reason="two"
            )
            assert db.popen is not None
            os.kill(db.popen.pid, signal.SIGSTOP)
            try:
                _, granted = await bob.approve(first.id)
                assert granted is not None
                with pytest.raises(RateLimitedError) as refused:
                    await bob.approve(second.id)
            finally:
                os.kill(db.popen.pid, signal.SIGCONT)
            assert refused.value.agent == "db-1"
            assert refused.value.retry_after is not None
            assert 0 < refused.value.retry_after <= 10
            # Rolled back: still pending, without bob's review, and no grant was made.
            still = await alice.get_request(second.id)
            assert still.state is RequestState.PENDING
            assert still.reviews == ()
            assert [g.request_id for g in await alice.list_grants()] == [first.id]
            # Once the agent caught up, the same approval goes through and is applied.
            approved: Any = None
            async with asyncio.timeout(30):
                while approved is None:
                    try:
                        approved = await bob.approve(second.id)
                    except RateLimitedError as exc:
                        await asyncio.sleep(exc.retry_after or 0.1)
            _, grant = approved
            assert grant is not None
            marker = tmp_path / "db-1-access" / "alice:deploy"
            await until(marker.exists, 30, "the approved grant applied on the host")
        finally:
            await alice.close()
            await bob.close()
            db.stop()
