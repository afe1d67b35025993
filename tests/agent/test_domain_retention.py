"""How long an ended lease's row stays (agent.domain.retention): pure, every kind of end."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from agent.domain.leases import LeaseState, tombstone
from agent.domain.retention import keep_until, prunable
from jitmesh.durations import MAX_DURATION

from .factories import T0, lease

WEEK = timedelta(days=7)
SKEW = timedelta(seconds=60)


def test_an_active_lease_stays() -> None:
    assert keep_until(lease(), retention=WEEK, skew_tolerance=SKEW) is None
    assert not prunable(lease(), T0 + 10 * MAX_DURATION, retention=WEEK, skew_tolerance=SKEW)


def test_an_expired_lease_stays_the_retention_period() -> None:
    row = lease(length=timedelta(minutes=10))
    expired = row.ended(at=row.not_after, reason="expired")
    assert keep_until(expired, retention=WEEK, skew_tolerance=SKEW) == row.not_after + WEEK
    # A retention shorter than the skew tolerance: the window closed plus the tolerance.
    short = timedelta(seconds=1)
    assert keep_until(expired, retention=short, skew_tolerance=SKEW) == row.not_after + SKEW


def test_a_lease_ended_early_refuses_late_copies_until_none_can_be_open() -> None:
    row = lease(length=timedelta(hours=8))
    for reason, state in (
        ("revoked", LeaseState.REMOVED),
        ("released", LeaseState.REMOVED),
        ("offline", LeaseState.REMOVED),
        ("snapshot", LeaseState.REMOVED),
        ("apply failed", LeaseState.FAILED),
    ):
        ended = row.ended(at=T0 + timedelta(hours=1), reason=reason, state=state)
        until = T0 + timedelta(hours=1) + MAX_DURATION + SKEW
        assert keep_until(ended, retention=WEEK, skew_tolerance=SKEW) == until, reason
        assert not prunable(
            ended, until - timedelta(seconds=1), retention=WEEK, skew_tolerance=SKEW
        )
        assert prunable(ended, until, retention=WEEK, skew_tolerance=SKEW)


def test_a_tombstone_stays_the_longest_grant_plus_the_skew_tolerance() -> None:
    buried = tombstone("grt-x", seq=3, at=T0, reason="revoked")
    assert keep_until(buried, retention=WEEK, skew_tolerance=SKEW) == T0 + MAX_DURATION + SKEW
    # A retention set longer than that wins.
    year2 = MAX_DURATION * 2
    assert keep_until(buried, retention=year2, skew_tolerance=SKEW) == T0 + year2


def test_a_row_without_an_end_time_stays() -> None:
    odd = replace(lease(), state=LeaseState.REMOVED, removed_at=None)
    assert keep_until(odd, retention=WEEK, skew_tolerance=SKEW) is None
