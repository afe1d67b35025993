"""Expiry decisions, offline grace, fail-closed time and backoff, with plain datetimes."""

from __future__ import annotations

from datetime import timedelta

import pytest

from agent.domain.expiry import EndCause, deadline, due, next_wakeup
from agent.domain.leases import LeaseState
from agent.domain.timekeeping import FailClosedTime, full_jitter, spread

from .factories import T0, lease, revoke_after

MIN = timedelta(minutes=1)


def test_lease_is_due_exactly_at_not_after() -> None:
    item = lease(length=10 * MIN)
    assert due([item], T0 + 10 * MIN - timedelta(milliseconds=1), None).ends == ()
    assert due([item], T0 + 10 * MIN, None).ends == ((item, EndCause.EXPIRED),)


def test_only_active_leases_are_due() -> None:
    gone = lease(state=LeaseState.REMOVED, length=MIN)
    buried = lease(state=LeaseState.TOMBSTONE, length=MIN)
    assert due([gone, buried], T0 + 2 * MIN, None) == due([], T0, None)


def test_scheduled_lease_starts_at_not_before() -> None:
    later = lease(start=5 * MIN, applied=False)
    assert due([later], T0 + 4 * MIN, None).starts == ()
    assert due([later], T0 + 5 * MIN, None).starts == (later,)


def test_scheduled_lease_past_its_end_is_ended_not_started() -> None:
    missed = lease(start=MIN, length=MIN, applied=False)
    result = due([missed], T0 + 3 * MIN, None)
    assert result.starts == ()
    assert result.ends == ((missed, EndCause.EXPIRED),)


def test_next_wakeup_is_the_earliest_start_or_end() -> None:
    short = lease(length=3 * MIN)
    long = lease(length=30 * MIN)
    later = lease(start=2 * MIN, applied=False)
    assert next_wakeup([long, short], None) == T0 + 3 * MIN
    assert next_wakeup([long, short, later], None) == T0 + 2 * MIN
    assert next_wakeup([lease(state=LeaseState.REMOVED)], None) is None
    assert next_wakeup([], None) is None


def test_hold_ignores_the_offline_time() -> None:
    item = lease(length=30 * MIN)
    assert deadline(item, T0) == (T0 + 30 * MIN, EndCause.EXPIRED)


def test_revoke_after_ends_grace_after_losing_the_coordinator() -> None:
    item = lease(length=30 * MIN, offline=revoke_after(5 * MIN))
    assert deadline(item, None) == (T0 + 30 * MIN, EndCause.EXPIRED)
    assert deadline(item, T0 + MIN) == (T0 + 6 * MIN, EndCause.OFFLINE)
    # The grace never extends a grant past its not_after.
    assert deadline(item, T0 + 29 * MIN) == (T0 + 30 * MIN, EndCause.EXPIRED)
    assert due([item], T0 + 6 * MIN, T0 + MIN).ends == ((item, EndCause.OFFLINE),)
    assert due([item], T0 + 6 * MIN, None).ends == ()
    assert next_wakeup([item], T0 + MIN) == T0 + 6 * MIN


def test_fail_closed_time_follows_the_wall_clock() -> None:
    time = FailClosedTime(wall=T0, mono=100.0)
    assert time.now(wall=T0 + MIN, mono=160.0) == T0 + MIN


def test_fail_closed_time_ignores_a_wall_clock_set_back() -> None:
    time = FailClosedTime(wall=T0, mono=100.0)
    assert time.now(wall=T0 - timedelta(hours=1), mono=130.0) == T0 + timedelta(seconds=30)


def test_fail_closed_time_takes_a_wall_clock_jump_forward() -> None:
    time = FailClosedTime(wall=T0, mono=100.0)
    assert time.now(wall=T0 + timedelta(hours=2), mono=101.0) == T0 + timedelta(hours=2)
    # And never runs back afterwards, even if the wall clock is corrected.
    assert time.now(wall=T0 + timedelta(seconds=2), mono=102.0) == T0 + timedelta(hours=2)


def test_fail_closed_time_starts_from_the_persisted_floor() -> None:
    floor = T0 + timedelta(hours=1)
    time = FailClosedTime(wall=T0, mono=5.0, floor=floor)
    assert time.now(wall=T0, mono=5.0) == floor
    assert time.now(wall=T0 + MIN, mono=65.0) == floor + MIN
    assert (
        FailClosedTime(wall=floor + MIN, mono=0.0, floor=floor).now(wall=floor + MIN, mono=0.0)
        == floor + MIN
    )


@pytest.mark.parametrize(
    ("attempt", "ceiling"), [(0, 1.0), (1, 2.0), (2, 4.0), (5, 32.0), (6, 60.0), (500, 60.0)]
)
def test_full_jitter_is_bounded_by_the_exponential_ceiling(attempt: int, ceiling: float) -> None:
    assert full_jitter(attempt, base=1.0, cap=60.0, rand=0.0) == 0.0
    assert full_jitter(attempt, base=1.0, cap=60.0, rand=0.5) == pytest.approx(ceiling / 2)
    assert full_jitter(attempt, base=1.0, cap=60.0, rand=0.999999) < ceiling


def test_spread_stays_within_half_either_way() -> None:
    assert spread(10.0, rand=0.0) == pytest.approx(5.0)
    assert spread(10.0, rand=0.5) == pytest.approx(10.0)
    assert spread(10.0, rand=1.0) == pytest.approx(15.0)
