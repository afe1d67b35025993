"""The coordinator's audit observer counts every event by kind, request outcomes, and the push
and revoke latencies the acks carry (counted per kind at once: a sweep writes thousands)."""

from __future__ import annotations

from datetime import UTC, datetime

from jitmesh import telemetry as t
from jitmesh.types import AuditEvent
from server.metrics import CoordinatorMetrics

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _event(kind: str, **details: str) -> AuditEvent:
    return AuditEvent(0, "aud-1", NOW, "alice", kind, "alice", "web-1", "", "", details, "", "")


def test_audit_events_are_counted_by_kind_with_outcomes_and_latencies() -> None:
    metrics = CoordinatorMetrics(agents_connected=lambda: 0)
    metrics.observe_audit(
        [_event("grant.expired")] * 3
        + [
            _event("request.approved"),
            _event("request.approved"),
            _event("grant.applied", latency_ms="250"),
            _event("grant.applied", latency_ms="not a number"),
            _event("grant.revoked", latency_ms="1500"),
            _event("grant.created", latency_ms="99"),
        ]
    )
    value = metrics.registry.get_sample_value
    assert value(t.AUDIT_EVENTS + "_total", {"kind": "grant.expired"}) == 3
    assert value(t.AUDIT_EVENTS + "_total", {"kind": "request.approved"}) == 2
    assert value(t.AUDIT_EVENTS + "_total", {"kind": "grant.applied"}) == 2
    assert value(t.REQUESTS + "_total", {"outcome": "approved"}) == 2
    assert value(t.REQUESTS + "_total", {"outcome": "created"}) == 0
    assert value(t.PUSH_LATENCY + "_count") == 1
    assert value(t.PUSH_LATENCY + "_sum") == 0.25
    assert value(t.REVOKE_LATENCY + "_count") == 1
    assert value(t.REVOKE_LATENCY + "_sum") == 1.5
