"""Prometheus metrics of the agent, on `--metrics-listen` (off by default).

Imported only when metrics are asked for: prometheus-client and its HTTP server then cost about
2 MiB of the agent's 50 MiB budget; without the flag the agent never loads them (the footprint
test checks). Values are refreshed from the lease table every few seconds, in the event loop,
and read by the HTTP server's thread. No label names a subject or a grant.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from agent.engine import Engine
from agent.store.sqlite import SqliteLeaseStore
from jitmesh import telemetry as t
from jitmesh.clock import Clock

log = logging.getLogger(__name__)

REFRESH_EVERY: Final = 5.0
# How long access outlived a grant's end: a sweep is due within a second of it (MAX_NAP);
# minutes or hours mean failing removals or an agent that was down.
OVERSTAY_BUCKETS: Final = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)


class AgentMetrics:
    def __init__(self, store: SqliteLeaseStore, engine: Engine, clock: Clock, listen: str) -> None:
        self._store = store
        self._engine = engine
        self._clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.active = Gauge(t.AGENT_ACTIVE_GRANTS, "Leases in force on this host.", registry=r)
        self.connected = Gauge(
            t.AGENT_CONNECTED, "1 while the stream to the coordinator is open.", registry=r
        )
        self.since_contact = Gauge(
            t.AGENT_SECONDS_SINCE_CONTACT,
            "Seconds since the coordinator was last heard from (offline grace counts from it).",
            registry=r,
        )
        self.outbox = Gauge(
            t.AGENT_OUTBOX_DEPTH, "Audit events waiting to reach the coordinator.", registry=r
        )
        self.removals = Gauge(
            t.PREFIX + "_agent_removals_pending",
            "Removals that failed and are being retried (their grants are REVOKE_FAILED).",
            registry=r,
        )
        self.overstay = Histogram(
            t.AGENT_EXPIRY_OVERSTAY,
            "Seconds a lease's access outlived its not_after before the expiry sweep removed it.",
            buckets=OVERSTAY_BUCKETS,
            registry=r,
        )
        self.enforcer_failures = Counter(
            t.AGENT_ENFORCER_FAILURES,
            "Failed enforcer calls, by enforcer kind (file, sudo, group, ssh, exec) and operation "
            "(apply, extend, remove, observe).",
            ["enforcer", "operation"],
            registry=r,
        )
        # Called from the event loop; prometheus-client's metrics are thread-safe for the
        # HTTP server's reads.
        engine.instrument(overstay=self.overstay.observe, enforcer_failed=self._enforcer_failed)
        host, _, port = listen.rpartition(":")
        self._server, self._thread = start_http_server(
            int(port), host.strip("[]"), registry=self.registry
        )
        self.port = self._server.server_port
        log.info("metrics listening", extra={t.ADDRESS: f"{host}:{self.port}"})

    def _enforcer_failed(self, enforcer: str, operation: str) -> None:
        self.enforcer_failures.labels(enforcer=enforcer, operation=operation).inc()

    async def refresh(self) -> None:
        now = self._clock.now()
        self.active.set(len(await self._store.active_leases()))
        meta = await self._store.meta()
        if meta.last_contact_at is not None:
            self.since_contact.set(max(0.0, (now - meta.last_contact_at).total_seconds()))
        self.connected.set(1 if self._engine.connected else 0)
        self.outbox.set(await self._store.outbox_depth())
        self.removals.set(len(await self._store.removals()))

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.refresh()
                except Exception as exc:  # never worth stopping the agent for
                    log.warning("metrics refresh failed", extra={t.ERROR: type(exc).__name__})
                await asyncio.sleep(REFRESH_EVERY)
        finally:
            self._server.shutdown()
            self._server.server_close()
