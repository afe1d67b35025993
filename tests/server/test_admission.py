"""Admission control of agent streams (server/domain/admission.py), pure."""

from __future__ import annotations

import pytest

from server.domain.admission import MAX_AHEAD, Admission, AdmissionSettings


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
    gate.welcomed()
    assert gate.admit(0.05) is not None
    assert gate.admit(0.2) is None


def test_handshakes_in_flight_are_bounded() -> None:
    gate = Admission(AdmissionSettings(rate=1e6, burst=1000, max_handshakes=2), now=0.0)
    assert gate.admit(0.0) is None
    assert gate.admit(0.0) is None
    assert gate.admit(0.0) is not None
    gate.welcomed()
    assert gate.admit(0.0) is None


def test_slots_never_lie_further_ahead_than_the_bound() -> None:
    gate = Admission(AdmissionSettings(rate=1.0, burst=1, max_handshakes=1000), now=0.0)
    gate.admit(0.0)
    hints = [gate.admit(0.0) for _ in range(100)]
    assert max(h for h in hints if h is not None) <= MAX_AHEAD
