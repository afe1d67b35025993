"""Trips to SQLite's connection threads on the operator paths that the benchmarks time: each
trip is a hand-off to aiosqlite's thread and back through the event loop (and, in a write
transaction, time holding the writer), so a change that adds one shows here, not only as a
slower benchmark (docs/performance.md, "Approval, trip by trip")."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any

import pytest

from jitmesh.types import GrantState, RequestState
from tests.server.helpers import Env, agent_link

M15 = timedelta(minutes=15)


def _count_trips(env: Env, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    store = env.coordinator.store
    counts = {"writer": 0, "reader": 0}
    for name in counts:
        conn = getattr(store, f"_{name}")

        def counted(
            real: Callable[..., Coroutine[Any, Any, Any]] = conn._execute, name: str = name
        ) -> Callable[..., Coroutine[Any, Any, Any]]:
            async def execute(fn: Any, *args: Any, **kwargs: Any) -> Any:
                counts[name] += 1
                return await real(fn, *args, **kwargs)

            return execute

        monkeypatch.setattr(conn, "_execute", counted())
    return counts


async def test_an_approval_and_an_automatic_request_take_few_trips(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each caller's token looked up once (remembered after), before counting.
    request, _ = await env.alice.create_request(
        agent="db-1", action="deploy", duration=M15, reason="x"
    )
    await env.bob.whoami()
    counts = _count_trips(env, monkeypatch)
    _, grant = await env.bob.approve(request.id)
    assert grant is not None
    # The transaction: [BEGIN, request, reviews, audit head], the review, [locks, agent], the
    # request's compare-and-set, the agent's seq, [command, grant, audit, outbox, COMMIT].
    assert counts == {"writer": 6, "reader": 0}
    counts.update(writer=0, reader=0)
    made, grant = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
    assert made.state is RequestState.APPROVED
    assert grant is not None
    # [agent, locks]; then the batch: [BEGIN, locks, audit head], the seqs, [request, grant,
    # command, audit, outbox, COMMIT].
    assert counts == {"writer": 3, "reader": 1}


async def test_an_ack_takes_few_trips(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        await link.hello("web-1")
        request, grant = await env.alice.create_request(
            agent="web-1", action="deploy", duration=M15
        )
        assert grant is not None
        await link.command()
        counts = _count_trips(env, monkeypatch)
        await link.ack(1, grant.id)
        await env.wait_grant_state(request.id, GrantState.ACTIVE)
    # [BEGIN, the ack, audit head], the grant, its compare-and-set move, [audit, outbox,
    # COMMIT].
    assert counts["writer"] == 4
