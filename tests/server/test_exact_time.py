"""Time is exact (issue 10 item 11): what a call returns at once equals what a later read
returns, also when the clock has sub-millisecond digits (the system clock has microseconds;
the store keeps whole milliseconds)."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from jitmesh.clock import EPOCH, FakeClock, to_ms, whole_ms
from jitmesh.types import GrantState
from tests.server.helpers import Env, agent_link
from tests.server.test_workflow import EXTENDING

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


RFC3339_MS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
LOOKS_LIKE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")


async def test_times_in_audit_details_have_the_one_format(env: Env) -> None:
    """Audit details reach webhooks and `jitctl audit -o json` beside `.mmmZ` times: each time
    in them is written the same way (before, `isoformat()` gave `+00:00` and microseconds)."""
    await env.admin.apply_policy(EXTENDING)
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        await link.hello("web-1")
        _, grant = await env.alice.create_request(agent="web-1", action="deploy", duration=FIFTEEN)
        assert grant is not None
        seq, _ = await link.command()
        await link.ack(seq, grant.id)
        await env.wait_grant_state(grant.request_id, GrantState.ACTIVE)
        await env.clock.advance(timedelta(minutes=5, microseconds=4321))
        await env.alice.extend_grant(grant.id, by=FIFTEEN, reason="still going")
        await env.admin.create_lock(agent="db-1", reason="INC-3", ttl=timedelta(minutes=7))
    times = {
        (event.kind, key): value
        for event in await env.admin.list_audit()
        for key, value in event.details.items()
        if LOOKS_LIKE_TIME.match(value)
    }
    assert {kind for kind, _ in times} >= {"grant.created", "grant.extended", "lock.created"}
    assert {k: v for k, v in times.items() if not RFC3339_MS.fullmatch(v)} == {}


def test_whole_ms_is_the_instant_floored_to_a_millisecond_in_utc() -> None:
    """`whole_ms` against its definition (epoch milliseconds, floored, back to an instant), for
    instants before and after 1970, each microsecond digit pattern, and zones other than UTC."""
    rng = random.Random(16)
    low, high = -(6 * 10**16), 6 * 10**16  # microseconds from the epoch: 1,900 years each way
    edges = [0, 1, 999, 1000, 1001, 999_999, -1, -999, -1000, -1001]
    zones = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
    for micros in edges + [rng.randrange(low, high) for _ in range(2000)]:
        for zone in zones:
            at = (EPOCH + timedelta(microseconds=micros)).astimezone(zone)
            expected = EPOCH + timedelta(milliseconds=(at - EPOCH) // timedelta(milliseconds=1))
            cut = whole_ms(at)
            assert cut == expected
            assert cut.tzinfo is UTC
            assert to_ms(cut) == micros // 1000
