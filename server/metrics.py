"""Prometheus metrics of the coordinator, served on `--metrics-listen` (off by default).

Names come from `jitmesh.telemetry`, shared with the logs. No label names an agent, a subject,
a grant or a request: with 10,000 agents the series would explode, and the endpoint is not
authenticated. Counts come from three places: the audit events this process writes (requests
by outcome, push and revoke latency, audit events by kind), values read at scrape time (agents
connected, rate-limit refusals), and the store's counts, refreshed every few seconds (grants by
state, unacknowledged commands, REVOKE_FAILED).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jitmesh import telemetry as t
from jitmesh.types import AuditEvent, GrantState
from server.domain.models import AuditKind
from server.settings import split_listen

if TYPE_CHECKING:
    from server.app import Coordinator

log = logging.getLogger(__name__)

REFRESH_EVERY: Final = 5.0
# Decision to agent ack: tens of milliseconds on a LAN, seconds for an agent that was away.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
STORE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
REQUEST_OUTCOMES: Final[dict[str, str]] = {
    AuditKind.REQUEST_CREATED: "created",
    AuditKind.REQUEST_APPROVED: "approved",
    AuditKind.REQUEST_DENIED: "denied",
    AuditKind.REQUEST_CANCELLED: "cancelled",
    AuditKind.REQUEST_EXPIRED: "expired",
    AuditKind.REQUEST_REFUSED: "refused",
}
LIVE_STATES: Final = tuple(s.value for s in GrantState if not s.terminal)


class CoordinatorMetrics:
    def __init__(
        self,
        *,
        agents_connected: Callable[[], int],
        rate_limited: Callable[[], dict[str, int]] = dict,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(t.REQUESTS, "Access requests by outcome.", ["outcome"], registry=r)
        self.audit_events = Counter(
            t.AUDIT_EVENTS, "Audit events written, by kind.", ["kind"], registry=r
        )
        self.push_latency = Histogram(
            t.PUSH_LATENCY,
            "From a grant's command being stored (the decision) to the agent's ack that it "
            "applied it.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.revoke_latency = Histogram(
            t.REVOKE_LATENCY,
            "From a revoke (or release) command being stored to the agent's ack that access "
            "is removed.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_transactions = Histogram(
            t.STORE_TX_LATENCY,
            "Write transactions of the store, BEGIN to COMMIT.",
            buckets=STORE_BUCKETS,
            registry=r,
        )
        self.grants = Gauge(t.GRANTS_BY_STATE, "Grants not ended, by state.", ["state"], registry=r)
        self.unacked = Gauge(
            t.UNACKED_COMMANDS,
            "Commands (grants and revokes) stored and not yet acknowledged by their agent.",
            registry=r,
        )
        self.revoke_failed = Gauge(
            t.REVOKE_FAILED,
            "Grants whose removal failed on the host (REVOKE_FAILED): access may remain.",
            registry=r,
        )
        self.unacked_revokes = Gauge(
            t.PREFIX + "_revokes_unacked",
            "Revokes sent and not yet acknowledged (grants in REVOKING).",
            registry=r,
        )
        for state in LIVE_STATES:
            self.grants.labels(state)
        for outcome in REQUEST_OUTCOMES.values():
            self.requests.labels(outcome)
        r.register(_ScrapeTime(agents_connected, rate_limited))

    def observe_audit(self, events: Sequence[AuditEvent]) -> None:
        """Hub observer: count what this process wrote (runs in the writer's call). Counted by
        kind first: a sweep writes 100,000 events of one kind, one labelled increment each was
        0.1-0.2 s of the writer's time."""
        for kind, count in collections.Counter(event.kind for event in events).items():
            self.audit_events.labels(kind).inc(count)
            outcome = REQUEST_OUTCOMES.get(kind)
            if outcome is not None:
                self.requests.labels(outcome).inc(count)
        for event in events:
            if event.kind == AuditKind.GRANT_APPLIED:
                histogram = self.push_latency
            elif event.kind in (AuditKind.GRANT_REVOKED, AuditKind.GRANT_RELEASED):
                histogram = self.revoke_latency
            else:
                continue
            latency = _latency(event)
            if latency is not None:
                histogram.observe(latency)

    def set_counts(self, grants: dict[str, int], unacked: int, revoking: int) -> None:
        for state in LIVE_STATES:
            self.grants.labels(state).set(grants.get(state, 0))
        self.unacked.set(unacked)
        self.unacked_revokes.set(revoking)
        self.revoke_failed.set(grants.get(GrantState.REVOKE_FAILED.value, 0))


def _latency(event: AuditEvent) -> float | None:
    text = event.details.get("latency_ms", "")
    if not text.isdigit():
        return None
    return int(text) / 1000


class _ScrapeTime(Collector):
    """Values read when Prometheus scrapes (from the HTTP server's thread: plain reads of ints
    the event loop writes)."""

    def __init__(
        self, agents_connected: Callable[[], int], rate_limited: Callable[[], dict[str, int]]
    ) -> None:
        self._agents = agents_connected
        self._limited = rate_limited

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(t.AGENTS_CONNECTED, "Agents with an open stream.", self._agents())
        refused = CounterMetricFamily(
            t.RATE_LIMITED, "Calls refused by a rate limit, by limit.", labels=["limit"]
        )
        for name, count in sorted(self._limited().items()):
            refused.add_metric([name], count)
        yield refused


class MetricsServer:
    """The HTTP endpoint and the refresh loop of one coordinator."""

    def __init__(self, coordinator: Coordinator, metrics: CoordinatorMetrics, listen: str) -> None:
        self.coordinator = coordinator
        self.metrics = metrics
        host, port = split_listen(listen)
        self._server, self._thread = start_http_server(port, host, registry=metrics.registry)
        self.port = self._server.server_port
        log.info("metrics listening", extra={t.ADDRESS: f"{host}:{self.port}"})

    async def refresh(self) -> None:
        now = self.coordinator.clock.now()
        counts = await self.coordinator.store.status_counts(now, now - timedelta(days=1))
        self.metrics.set_counts(
            counts.grants, counts.commands_unacknowledged, counts.revokes_unacknowledged
        )

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # a store hiccup must not end the coordinator
                log.warning("metrics refresh failed", extra={t.ERROR: type(exc).__name__})
            await asyncio.sleep(REFRESH_EVERY)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(coordinator: Coordinator, listen: str) -> MetricsServer:
    """Start the endpoint for `coordinator` and hook the metrics into its parts."""
    metrics = CoordinatorMetrics(
        agents_connected=coordinator.registry.count,
        rate_limited=coordinator.rate_limit_refusals,
    )
    coordinator.hub.audit_observers.append(metrics.observe_audit)
    traced = coordinator.store.observe_transaction  # the tracing's, when on

    def observe(seconds: float) -> None:
        metrics.store_transactions.observe(seconds)
        if traced is not None:
            traced(seconds)

    coordinator.store.observe_transaction = observe
    return MetricsServer(coordinator, metrics, listen)
