"""Clock trust: "now" that never goes back, an untrusted clock at start, skew at a Welcome."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import pytest

from agent.domain.leases import EventKind
from tests.agent.factories import T0, command, grant

from .conftest import Bench

SEC = timedelta(seconds=1)


async def test_now_before_start_is_an_error(build: Callable[..., Bench]) -> None:
    bench = build()
    with pytest.raises(RuntimeError, match="not started"):
        bench.parts.time.now()


async def test_now_never_goes_back_with_the_wall_clock(bench: Bench) -> None:
    time = bench.parts.time
    await bench.clock.advance(5 * SEC)
    assert time.now() == T0 + 5 * SEC
    await bench.clock.jump_wall(-timedelta(hours=1))
    assert time.now() == T0 + 5 * SEC
    await bench.clock.advance(SEC)  # runs on with the monotonic clock
    assert time.now() == T0 + 6 * SEC


async def test_a_wall_clock_behind_the_last_time_seen_is_untrusted_until_a_welcome(
    build: Callable[..., Bench],
) -> None:
    bench = build()
    await bench.store.note_wall(T0 + timedelta(hours=1))
    time = bench.parts.time
    time.start(await bench.store.meta())
    assert time.untrusted
    # "now" starts from the floor, not the wall clock behind it.
    assert time.now() == T0 + timedelta(hours=1)
    assert time.grant_problem(command(1, grant()), time.now()) == "agent clock untrusted"

    await time.coordinator_time_seen(T0 + timedelta(hours=2))
    assert not time.untrusted
    assert time.grant_problem(command(1, grant()), time.now()) is None
    assert [k for k, _, _ in await bench.kinds()] == [EventKind.CLOCK_TRUSTED]
    assert bench.parts.shared.outbox_changed.is_set()


async def test_a_clock_within_the_slack_is_trusted(build: Callable[..., Bench]) -> None:
    bench = build()
    await bench.store.note_wall(T0 + SEC)
    bench.parts.time.start(await bench.store.meta())
    assert not bench.parts.time.untrusted


async def test_a_clock_ahead_of_the_coordinator_refuses_grants_until_a_welcome_agrees(
    build: Callable[..., Bench],
) -> None:
    bench = build(skew=timedelta(seconds=5))
    time = bench.parts.time
    time.start(await bench.store.meta())
    await time.coordinator_time_seen(T0 - timedelta(seconds=30))
    assert time.skewed
    assert time.grant_problem(command(1, grant()), time.now()) == "clock skew beyond tolerance"
    (kind, _, details), *_ = await bench.kinds()
    assert (kind, details["refusing"], details["skew_ms"]) == (
        EventKind.CLOCK_SKEWED,
        "true",
        "30000",
    )
    # The coordinator's clock caught up with ours (or ours was stepped back): trusted again.
    await bench.clock.advance(timedelta(seconds=40))
    await time.coordinator_time_seen(time.now())
    assert not time.skewed
    assert [k for k, _, _ in await bench.kinds()][-1] == EventKind.CLOCK_TRUSTED


async def test_a_clock_behind_the_coordinator_is_moved_forward_and_audited(
    build: Callable[..., Bench],
) -> None:
    bench = build(skew=timedelta(seconds=5))
    time = bench.parts.time
    time.start(await bench.store.meta())
    await time.coordinator_time_seen(T0 + timedelta(seconds=30))
    assert time.now() == T0 + timedelta(seconds=30)
    assert not time.skewed  # corrected, so grants are not refused
    (kind, _, details), *_ = await bench.kinds()
    assert (kind, details["refusing"]) == (EventKind.CLOCK_SKEWED, "false")


async def test_a_grant_issued_in_the_future_beyond_the_tolerance_is_refused(
    build: Callable[..., Bench],
) -> None:
    bench = build(skew=timedelta(seconds=5))
    time = bench.parts.time
    time.start(await bench.store.meta())
    early = replace(command(1, grant()), issued_at=T0 + timedelta(seconds=6))
    late = replace(command(1, grant()), issued_at=T0 - timedelta(hours=1))
    assert time.grant_problem(early, time.now()) == "clock skew beyond tolerance"
    assert time.grant_problem(late, time.now()) is None


async def test_the_wall_time_is_persisted_now_and_then(bench: Bench) -> None:
    time = bench.parts.time
    await time.note_wall_if_due(time.now())
    assert (await bench.store.meta()).last_wall_at == T0
    await bench.clock.advance(5 * SEC)
    await time.note_wall_if_due(time.now())
    assert (await bench.store.meta()).last_wall_at == T0
    await bench.clock.advance(5 * SEC)
    await time.note_wall_if_due(time.now())
    assert (await bench.store.meta()).last_wall_at == T0 + 10 * SEC
