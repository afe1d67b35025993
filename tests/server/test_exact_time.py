"""Time is exact (issue 10 item 11): what a call returns at once equals what a later read
returns, also when the clock has sub-millisecond digits (the system clock has microseconds;
the store keeps whole milliseconds)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from jitmesh.clock import FakeClock
from tests.server.helpers import Env

FIFTEEN = timedelta(minutes=15)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC))


async def test_a_grant_from_approve_equals_the_grant_read_back(env: Env) -> None:
    created = await env.alice.create_request(
        agent="db-1", action="deploy", duration=FIFTEEN, reason="INC-1"
    )
    assert created.grant is None
    await env.clock.advance(timedelta(microseconds=654321))
    request, grant = await env.bob.approve(created.request.id)
    assert grant is not None
    assert grant.not_before.microsecond % 1000 == 0
    assert await env.alice.get_grant(grant.id) == grant
    assert (await env.alice.get_request(request.id)).decided_at == request.decided_at


async def test_a_grant_approved_by_policy_equals_the_grant_read_back(env: Env) -> None:
    created = await env.alice.create_request(agent="web-1", action="deploy", duration=FIFTEEN)
    assert created.grant is not None
    assert await env.alice.get_grant(created.grant.id) == created.grant
    assert await env.alice.get_request(created.request.id) == created.request
