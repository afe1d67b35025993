"""The engine: one small object that builds the parts and is the agent's one way in.

Every change to the lease table and the host goes through one part or another, one at a time
(the shared lock): command handling (`commands`), the expiry sweep (`expiry`), the start-up and
periodic reconcile (`reconcile`), the bookkeeping of background removal retries (`removals`).
Enforcement (`enforcement`) is the one place where leases become apply/remove on the host,
reference-counted. Clock trust (`clocktrust`) says what time it is and whether grants may be
believed; link state (`linkstate`) what the engine knows of its coordinator. The table is the
truth; the expiry loop's timers are derived from it on every pass.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from agent import defaults
from agent.domain.breakglass import Code, Refused
from agent.domain.commands import Ack, CommandSpec
from agent.domain.leases import EventKind, Lease, OutboxEvent, Pair, new_event
from agent.domain.removals import RetryPolicy
from agent.domain.steps import StepHook, no_hook
from agent.enforcers.base import EnforcerSet
from agent.engine.breakglass import Breakglass
from agent.engine.clocktrust import ClockTrust
from agent.engine.commands import Commands
from agent.engine.enforcement import Enforcement
from agent.engine.expiry import Expiry
from agent.engine.linkstate import HelloState, LinkState
from agent.engine.reconcile import Reconciler
from agent.engine.removals import Removals
from agent.engine.retention import Retention
from agent.engine.shared import Shared, best_effort
from agent.store.base import LeaseStore
from jitmesh.clock import Clock, rfc3339


@dataclass(frozen=True, slots=True)
class Parts:
    shared: Shared
    time: ClockTrust
    link: LinkState
    removals: Removals
    enforcement: Enforcement
    reconciler: Reconciler
    expiry: Expiry
    commands: Commands
    retention: Retention
    breakglass: Breakglass


def assemble(
    *,
    name: str,
    store: LeaseStore,
    enforcers: EnforcerSet,
    clock: Clock,
    rand: Callable[[], float] = random.random,
    remove_retries: int = defaults.REMOVE_RETRIES,
    remove_retry_base: float = defaults.REMOVE_RETRY_BASE,
    skew_tolerance: timedelta | None = None,
    reconcile_every: float | None = None,
    lease_retention: timedelta = timedelta(seconds=defaults.LEASE_RETENTION),
    step: StepHook = no_hook,
) -> Parts:
    """The parts, each given the others it needs (the engine's tests build them here too)."""
    shared = Shared()
    time = ClockTrust(store=store, clock=clock, shared=shared, skew_tolerance=skew_tolerance)
    now = time.now
    link = LinkState(store=store, shared=shared, now=now)
    # A revoke's attempts (the first inline, the others in the background), then REVOKE_FAILED
    # and a retry every base * 2^retries, at most every 10 minutes (docs/promises.md, P4).
    policy = RetryPolicy.from_settings(remove_retries, remove_retry_base)
    removals = Removals(
        store=store,
        enforcers=enforcers,
        clock=clock,
        shared=shared,
        policy=policy,
        rand=rand,
        now=now,
    )
    enforcement = Enforcement(store=store, enforcers=enforcers, removals=removals, now=now)
    reconciler = Reconciler(
        store=store,
        enforcers=enforcers,
        clock=clock,
        shared=shared,
        removals=removals,
        now=now,
        every=reconcile_every,
    )
    retention = Retention(store=store, clock=clock, shared=shared, time=time, keep=lease_retention)
    expiry = Expiry(
        store=store,
        clock=clock,
        shared=shared,
        time=time,
        link=link,
        enforcement=enforcement,
        removals=removals,
        reconciler=reconciler,
        retention=retention,
        rand=rand,
    )
    commands = Commands(
        name=name,
        store=store,
        shared=shared,
        time=time,
        link=link,
        enforcement=enforcement,
        removals=removals,
        expiry=expiry,
        step=step,
    )
    breakglass = Breakglass(
        name=name, store=store, shared=shared, time=time, enforcement=enforcement
    )
    return Parts(
        shared,
        time,
        link,
        removals,
        enforcement,
        reconciler,
        expiry,
        commands,
        retention,
        breakglass,
    )


class Engine:
    def __init__(
        self,
        *,
        name: str,
        store: LeaseStore,
        enforcers: EnforcerSet,
        clock: Clock,
        rand: Callable[[], float] = random.random,
        remove_retries: int = defaults.REMOVE_RETRIES,
        remove_retry_base: float = defaults.REMOVE_RETRY_BASE,
        skew_tolerance: timedelta | None = None,
        reconcile_every: float | None = None,
        lease_retention: timedelta = timedelta(seconds=defaults.LEASE_RETENTION),
        step: StepHook = no_hook,
    ) -> None:
        """`remove_retries`: attempts at a revoke's removal before its grant is reported
        `grant.revoke_failed`, `remove_retry_base` apart, doubling, +-50 % (the revoke itself is
        acked FAILED after the first, inline, attempt; REVOKED follows a removal that worked).
        `skew_tolerance`: grants issued further from the agent's time are refused (None: no
        check). `reconcile_every`: seconds between drift reconciles while running (None: only
        at start). `lease_retention`: ended leases stay in the table at least this long
        (`agent.domain.retention`). `step`: told each step of an apply and a revoke
        (`agent.domain.steps`: the fault suite's crash points; production passes none)."""
        self.name = name
        self._store = store
        self._enforcers = enforcers
        parts = assemble(
            name=name,
            store=store,
            enforcers=enforcers,
            clock=clock,
            rand=rand,
            remove_retries=remove_retries,
            remove_retry_base=remove_retry_base,
            skew_tolerance=skew_tolerance,
            reconcile_every=reconcile_every,
            lease_retention=lease_retention,
            step=step,
        )
        self._shared = parts.shared
        self._time = parts.time
        self._link = parts.link
        self._removals = parts.removals
        self._reconciler = parts.reconciler
        self._enforcement = parts.enforcement
        self._expiry = parts.expiry
        self._commands = parts.commands
        self._retention = parts.retention
        self._breakglass = parts.breakglass

    @property
    def outbox_changed(self) -> asyncio.Event:
        """Set when the outbox gains events or loses acknowledged ones (the link's sender
        waits)."""
        return self._shared.outbox_changed

    @property
    def connected(self) -> bool:
        """Welcomed by the coordinator on the current stream."""
        return self._link.connected

    def now(self) -> datetime:
        return self._time.now()

    async def start(self) -> None:
        """Before connecting: end what expired while the agent was down, then reconcile the
        enforcers with the table."""
        meta = await self._store.meta()
        wall = self._time.start(meta)
        self._link.load(meta)
        await self._removals.load(wall)
        async with self._shared.lock:
            if self._time.untrusted:
                await self._expiry.end_everything(
                    reason="clock_untrusted",
                    event=new_event(
                        EventKind.CLOCK_UNTRUSTED,
                        at=self.now(),
                        details={
                            "wall": rfc3339(wall),
                            "last_seen": rfc3339(meta.last_wall_at) if meta.last_wall_at else "",
                        },
                    ),
                )
            await self._reconciler.adopt_applied()
            await self._expiry.sweep_locked(while_down=True)
            await self._reconciler.reconcile_locked()

    async def run(self) -> None:
        """The expiry loop and, beside it, the loop retrying pending removals and the one
        pruning ended leases."""
        await self._expiry.run()

    async def prune(self) -> int:
        """Delete the ended leases kept long enough now; how many."""
        return await self._retention.prune()

    async def handle(self, command: CommandSpec) -> Ack:
        return await self._commands.handle(command)

    async def handle_many(self, commands: Sequence[CommandSpec]) -> list[Ack]:
        """`handle` for commands received together (in order, the same acks), grants that
        start now persisted in one commit."""
        return await self._commands.handle_many(commands)

    async def sweep(self) -> float:
        """Start and end what is due; returns the seconds until the next sweep is needed."""
        return await self._expiry.sweep()

    async def reconcile(self) -> None:
        """Compare the host with the lease table now (drift)."""
        await self._reconciler.reconcile()

    # The local socket's view.

    async def allowing(self, subject: str, action: str) -> Lease | None:
        """The live lease that lets `subject` do `action` now and lasts longest (None: none)."""
        now = self.now()
        found = [
            lease
            for lease in await self._store.active_leases()
            if lease.pair == (subject, action) and lease.allows(now)
        ]
        return max(found, key=lambda lease: lease.not_after, default=None)

    async def holds_any(self, subject: str) -> bool:
        """Whether some live lease still holds access for `subject` on this host."""
        return any(
            lease.holds and lease.subject == subject for lease in await self._store.active_leases()
        )

    async def release(self, grant_id: str) -> bool:
        """End a lease on the host now (released: `exec --release`)."""
        return await self._expiry.end_now(grant_id, "released")

    def instrument(
        self,
        *,
        overstay: Callable[[float], None],
        enforcer_failed: Callable[[str, str], None],
    ) -> None:
        """Metrics hooks: `overstay(seconds)` for each lease ended by expiry (how long its
        access outlived its not_after), `enforcer_failed(kind, operation)` for each failed call
        to an enforcer. Plain callables: the engine never imports the exporter."""
        self._expiry.on_overstay = overstay
        self._enforcers.on_failure = enforcer_failed

    def on_access_removed(self, listener: Callable[[Pair, str], None]) -> None:
        """`listener(pair, cause)` after a pair's access was really removed from the host."""
        self._enforcement.on_removed.append(listener)

    async def audit(self, event: OutboxEvent) -> None:
        """An event observed on the host, for the coordinator's audit log (through the outbox)."""
        with best_effort("an event"):
            await self._store.add_event(event)
        self._shared.outbox_changed.set()

    async def use_breakglass(
        self, code: Code, *, caller: str | None, caller_is_root: bool, cap: timedelta
    ) -> Lease | Refused:
        """Grant the lease a verified break-glass code allows (at most `cap` long), or say why
        not (docs/wire.md, "Break-glass codes")."""
        return await self._breakglass.use(
            code, caller=caller, caller_is_root=caller_is_root, cap=cap
        )

    async def breakglass_adopted(self, code_ids: Iterable[str]) -> None:
        """The coordinator answered a Hello that reported these uses: they are adopted."""
        with best_effort("adopted break-glass uses"):
            await self._store.breakglass_adopted(code_ids)

    # Clock trust.

    async def coordinator_time_seen(self, at: datetime) -> None:
        await self._time.coordinator_time_seen(at)

    # The link's view.

    async def checkpoint(self) -> None:
        await self._link.checkpoint()

    async def hello_state(self) -> HelloState:
        return await self._link.hello_state()

    async def note_epoch(self, epoch: int) -> None:
        await self._link.note_epoch(epoch)

    async def coordinator_reached(self) -> None:
        await self._link.reached()

    async def coordinator_alive(self) -> None:
        await self._link.alive()

    async def coordinator_lost(self) -> None:
        await self._link.lost()

    async def pending_events(self, limit: int) -> list[OutboxEvent]:
        return await self._link.pending_events(limit)

    async def events_delivered(self, event_ids: Iterable[str]) -> None:
        await self._link.events_delivered(event_ids)
