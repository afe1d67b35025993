"""The pushback rule and the measured apply rates (server/domain/delivery.py), pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from server.domain.delivery import (
    ASSUMED_RATE,
    AWAY_RETRY,
    MAX_RETRY,
    MIN_RETRY,
    DeliveryGate,
    DeliveryRates,
    pushback,
)

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
S = timedelta(seconds=1)


def test_a_connected_agent_takes_what_it_can_apply_within_a_quarter_of_the_grant() -> None:
    # 100/s, 20 s grant: 5 s of budget, 500 commands; the count bound is higher.
    for ahead in (0, 1, 499):
        assert pushback("a", ahead, 20 * S, connected=True, rate=100.0, max_undelivered=900) is None
    refused = pushback("a", 500, 20 * S, connected=True, rate=100.0, max_undelivered=900)
    assert refused is not None
    assert (refused.agent, refused.undelivered, refused.limit) == ("a", 500, 500)
    assert refused.retry_after == MIN_RETRY  # one command over: the floor


def test_the_delivery_budget_is_at_most_five_seconds() -> None:
    # A quarter of two hours would be half an hour; 5 s at 100/s is 500.
    hours = timedelta(hours=2)
    assert pushback("a", 499, hours, connected=True, rate=100.0, max_undelivered=9000) is None
    assert pushback("a", 500, hours, connected=True, rate=100.0, max_undelivered=9000) is not None


def test_the_count_bound_holds_for_everyone() -> None:
    assert pushback("a", 50, 4 * S, connected=True, rate=1000.0, max_undelivered=50) is not None
    away = pushback("a", 50, 4 * S, connected=False, rate=1000.0, max_undelivered=50)
    assert away is not None
    assert away.retry_after == AWAY_RETRY
    # Away: its grants wait for it as before, up to the count.
    assert pushback("a", 49, 4 * S, connected=False, rate=0.5, max_undelivered=50) is None


def test_an_unmeasured_agent_is_assumed_slow_and_always_takes_one() -> None:
    limit = int(ASSUMED_RATE * 20 * 0.25)
    assert pushback("a", limit - 1, 20 * S, connected=True, rate=None, max_undelivered=900) is None
    assert pushback("a", limit, 20 * S, connected=True, rate=None, max_undelivered=900)
    assert pushback("a", 0, S, connected=True, rate=0.01, max_undelivered=900) is None


def test_an_agent_slower_than_measured_gets_nothing_until_its_backlog_is_gone() -> None:
    slow = pushback("a", 10, 20 * S, connected=True, rate=100.0, max_undelivered=900, latency=6.0)
    assert slow is not None
    assert slow.retry_after == timedelta(seconds=10 / 100)
    assert (
        pushback("a", 0, 20 * S, connected=True, rate=100.0, max_undelivered=900, latency=6.0)
        is None
    )


def test_retry_hints_are_bounded() -> None:
    far = pushback("a", 10_000, 4 * S, connected=True, rate=1.0, max_undelivered=20_000)
    assert far is not None
    assert far.retry_after == MAX_RETRY
    assert "agent a has 10000 undelivered commands" in far.message()


def test_the_rate_counts_busy_time_only() -> None:
    rates = DeliveryRates()
    rates.acked("a", 1, T0, T0, T0)
    assert rates.rate("a") is None
    # Idle in between (the command came after the last ack): no sample.
    rates.acked("a", 1, T0 + 5 * S, T0 + 5 * S, T0 + 5 * S + timedelta(milliseconds=10))
    assert rates.rate("a") is None
    # Busy: 50 commands, all waiting since before the last ack, acked 0.5 s later.
    at = T0 + 6 * S
    rates.acked("a", 50, T0 + 5 * S, T0 + 5 * S, at)
    assert rates.rate("a") == pytest.approx(
        50 / (at - (T0 + 5 * S + timedelta(milliseconds=10))).total_seconds()
    )
    assert rates.latency("a") == pytest.approx(1.0)


def test_bursty_acks_give_the_overall_rate() -> None:
    # 100 commands per second, acked in bursts of 10 every 0.1 s or of 50 every 0.5 s.
    for burst in (10, 50):
        rates = DeliveryRates()
        at = T0
        rates.acked("a", 1, at, at, at)
        for _ in range(40):
            nxt = at + timedelta(seconds=burst / 100)
            rates.acked("a", burst, T0, T0, nxt)
            at = nxt
        assert rates.rate("a") == pytest.approx(100.0, rel=0.01)


def test_the_gate_asks_whether_the_agent_is_connected() -> None:
    rates = DeliveryRates()
    here = {"a"}
    gate = DeliveryGate(rates, 50, here.__contains__)
    assert gate.check("a", 10, 2 * S) is not None  # assumed 20/s x 0.5 s = 10
    assert gate.check("b", 10, 2 * S) is None  # away: the count only
