"""Admission control of agent streams (server/domain/admission.py), pure."""

from __future__ import annotations

import pytest

from server.domain.admission import MAX_AHEAD, MIN_PACE, Admission, AdmissionSettings


def test_a_burst_is_admitted_then_the_rest_get_spread_out_slots() -> None:
    gate = Admission(AdmissionSettings(rate=10.0, burst=10, max_handshakes=1000), now=0.0)
    assert [gate.admit(0.0) for _ in range(10)] == [None] * 10
    hints = [gate.admit(0.0) for _ in range(5)]
    # One slot per refused agent, 1/rate apart: they come back at the pace the bucket admits.
    assert hints == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    # The bucket refills meanwhile: whoever comes then is admitted.
    assert gate.admit(0.45) is None


def test_the_bucket_refills_at_its_rate() -> None:
    gate = Admission(AdmissionSettings(rate=10.0, burst=1, max_handshakes=1000), now=0.0)
    assert gate.admit(0.0) is None
    gate.welcomed(0.0, 0.01)
    assert gate.admit(0.05) is not None
    assert gate.admit(0.2) is None


def test_handshakes_in_flight_are_bounded() -> None:
    gate = Admission(AdmissionSettings(rate=1e6, burst=1000, max_handshakes=2), now=0.0)
    assert gate.admit(0.0) is None
    assert gate.admit(0.0) is None
    assert gate.admit(0.0) is not None
    gate.welcomed(0.0, 0.0)
    assert gate.admit(0.0) is None


def test_slots_never_lie_further_ahead_than_the_bound() -> None:
    gate = Admission(AdmissionSettings(rate=1.0, burst=1, max_handshakes=1000), now=0.0)
    gate.admit(0.0)
    hints = [gate.admit(0.0) for _ in range(100)]
    assert max(h for h in hints if h is not None) <= MAX_AHEAD


def test_with_handshakes_at_their_bound_slots_follow_the_pace_they_end() -> None:
    """A coordinator slower than its rate: 50 handshakes in flight that take 2 s each end at
    25 a second, so the refused are given slots 0.04 s apart, not the bucket's 0.001 s (which
    would bring them back long before they can be taken, to be refused again)."""
    gate = Admission(AdmissionSettings(rate=1000.0, burst=1000, max_handshakes=50), now=0.0)
    assert [gate.admit(0.0) for _ in range(50)] == [None] * 50
    gate.welcomed(0.0, 2.0)  # one ended after 2 s ...
    assert gate.admit(2.0) is None  # ... and its place is taken at once
    hints = [gate.admit(2.0) for _ in range(3)]
    assert hints == pytest.approx([0.05, 0.08, 0.12])  # the first: no hint below MIN_HINT


def test_refused_by_the_bucket_alone_slots_keep_the_buckets_rate() -> None:
    gate = Admission(AdmissionSettings(rate=10.0, burst=2, max_handshakes=1000), now=0.0)
    gate.admit(0.0)
    gate.welcomed(0.0, 5.0)  # slow handshakes, but far from the bound
    gate.admit(5.0)
    gate.admit(5.0)
    assert gate.admit(5.0) == pytest.approx(0.1)


def test_stalled_handshakes_slow_the_slots_no_further_than_the_floor_and_the_bound() -> None:
    gate = Admission(AdmissionSettings(rate=1000.0, burst=1000, max_handshakes=2), now=0.0)
    gate.admit(0.0)
    gate.admit(0.0)
    gate.welcomed(0.0, 1000.0)
    gate.admit(1000.0)
    hints = [gate.admit(1000.0) for _ in range(1000)]
    assert hints[0] == pytest.approx(1.0 / MIN_PACE)
    assert max(h for h in hints if h is not None) <= MAX_AHEAD
