"""The engine's parts, each built as the engine builds them, on a real SQLite lease table, a fake
clock and a recording enforcer (the part under test is driven directly, not through `Engine`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from agent.domain.leases import Lease
from agent.enforcers.base import EnforcerSet
from agent.engine.core import Parts, assemble
from agent.store.sqlite import SqliteLeaseStore
from jitmesh.clock import FakeClock
from tests.agent.factories import AGENT, T0
from tests.agent.fakes import RecordingEnforcer


@dataclass
class Bench:
    parts: Parts
    store: SqliteLeaseStore
    clock: FakeClock
    hook: RecordingEnforcer

    async def kinds(self) -> list[tuple[str, str, dict[str, str]]]:
        return [(e.kind, e.grant_id, dict(e.details)) for e in await self.store.pending_events(100)]

    async def put(self, *leases: Lease, seq: int = 1) -> None:
        """Leases written to the table as a command would (nothing enforced)."""
        await self.store.record_command(seq=seq, epoch=1, writes=leases)


@pytest.fixture
async def build(tmp_path: Path) -> AsyncIterator[Callable[..., Bench]]:
    stores: list[SqliteLeaseStore] = []

    def make(
        *,
        hook: RecordingEnforcer | None = None,
        retries: int = 1,
        retry_base: float = 0.0,
        skew: timedelta | None = None,
        reconcile_every: float | None = None,
        enforcers: EnforcerSet | None = None,
        clock: FakeClock | None = None,
        lease_retention: timedelta = timedelta(days=7),
    ) -> Bench:
        state = tmp_path / f"state{len(stores)}"
        state.mkdir()
        store = SqliteLeaseStore.open(state)
        stores.append(store)
        hook = hook or RecordingEnforcer()
        clock = clock or FakeClock(T0)
        parts = assemble(
            name=AGENT,
            store=store,
            enforcers=enforcers or EnforcerSet([hook]),
            clock=clock,
            rand=lambda: 0.5,
            remove_retries=retries,
            remove_retry_base=retry_base,
            skew_tolerance=skew,
            reconcile_every=reconcile_every,
            lease_retention=lease_retention,
        )
        return Bench(parts, store, clock, hook)

    yield make
    for store in stores:
        store.close()


@pytest.fixture
async def bench(build: Callable[..., Bench]) -> Bench:
    """Parts whose clock has started (what `Engine.start` does first)."""
    made = build()
    made.parts.time.start(await made.store.meta())
    return made
