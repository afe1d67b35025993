"""The agent's core: applies commands, starts and ends leases on time, reconciles the host.

Every change to the lease table and the host goes through here, one at a time (one lock): command
handling, the expiry sweep and the start-up reconcile. For each command: validate, persist (one
transaction), enforce (reference-counted), then answer with the ack. The table is the truth; the
expiry loop's timers are derived from it on every pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from agent.domain import commands, expiry
from agent.domain.commands import (
    Ack,
    AckStatus,
    AlreadyEnded,
    Bury,
    CommandSpec,
    GrantSpec,
    Keep,
    Refuse,
    RevokeSpec,
    SnapshotSpec,
)
from agent.domain.coverage import held_pairs, pair_changes, reconcile
from agent.domain.errors import ApplyFailed, EnforcerError, StateError
from agent.domain.leases import EventKind, Lease, OutboxEvent, Pair, new_event
from agent.domain.timekeeping import FailClosedTime, spread
from agent.enforcers.base import EnforcerSet
from agent.store.base import LeaseStore
from jitmesh.clock import Clock
from jitmesh.crashpoints import crash_point

log = logging.getLogger(__name__)

# The expiry loop wakes at least this often, so a wall clock that jumps forward is noticed soon
# (the monotonic clock it otherwise sleeps on cannot see such a jump).
MAX_NAP = 1.0
# How often the loop persists the wall time reached (the floor after a restart).
WALL_NOTE_EVERY = timedelta(seconds=10)
# Retrying removals that failed: exponential from RETRY_BASE to RETRY_CAP, +-50 %.
RETRY_BASE = 1.0
RETRY_CAP = 60.0
REVOKE_FAILED_RETRY = 600.0
MAX_REASON = 256
# A wall clock this much behind the last recorded time at start is not yet "untrusted" (the time
# is recorded as the agent runs, a little ahead of a clean stop).
CLOCK_SLACK = timedelta(seconds=1)


@dataclass(frozen=True, slots=True)
class HelloState:
    last_applied_seq: int
    epoch: int
    active_grant_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Failures:
    apply: dict[Pair, str]
    remove: dict[Pair, str]


class Engine:
    def __init__(
        self,
        *,
        name: str,
        store: LeaseStore,
        enforcers: EnforcerSet,
        clock: Clock,
        rand: Callable[[], float] = random.random,
        remove_retries: int = 1,
        remove_retry_base: float = 0.0,
        skew_tolerance: timedelta | None = None,
        reconcile_every: float | None = None,
    ) -> None:
        """`remove_retries`: attempts at a revoke's removal before it is acked FAILED (the
        coordinator's REVOKE_FAILED), `remove_retry_base` apart, doubling, +-50 %.
        `skew_tolerance`: grants issued further from the agent's time are refused (None: no
        check)."""
        self.name = name
        self._store = store
        self._enforcers = enforcers
        self._clock = clock
        self._rand = rand
        # Set when the outbox gains events or loses acknowledged ones (the link's sender waits).
        self.outbox_changed = asyncio.Event()
        self._leases_changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._time: FailClosedTime | None = None
        self._connected = False
        self._offline_since: datetime | None = None
        self._last_applied_seq = 0
        self._epoch = 0
        # Pairs whose removal failed after their lease row had already ended (revoke, snapshot,
        # a failed rollback): retried by the sweep until they succeed. Value: the grant id or "".
        self._pending_removals: dict[Pair, str] = {}
        self._retry_attempt = 0
        self._wall_noted_at: datetime | None = None
        self._remove_retries = max(1, remove_retries)
        self._remove_retry_base = remove_retry_base
        # After a revoke's own attempts, the sweep keeps retrying from the same base, up to
        # base * 2^retries, at most every 10 minutes (PROMISES.md: "then retry every 10 min").
        self._sweep_retry_base = remove_retry_base or RETRY_BASE
        self._sweep_retry_cap = (
            min(REVOKE_FAILED_RETRY, remove_retry_base * 2.0**self._remove_retries)
            if remove_retry_base
            else RETRY_CAP
        )
        self._skew = skew_tolerance
        # Seconds between drift reconciles while running (None: only at start).
        self._reconcile_every = reconcile_every
        self._reconciled_at = clock.monotonic()
        # Set at start when the wall clock is behind the last recorded time; cleared by the
        # coordinator's time in a Welcome. While set, grants are refused.
        self._clock_untrusted = False
        # Set while the last Welcome showed the agent's clock further from the coordinator's
        # than the tolerance: grants are refused (and audited) until a Welcome agrees again.
        self._skewed = False

    @property
    def connected(self) -> bool:
        """Welcomed by the coordinator on the current stream."""
        return self._connected

    def now(self) -> datetime:
        if self._time is None:
            raise RuntimeError("the engine has not started")
        return self._time.now(wall=self._clock.now(), mono=self._clock.monotonic())

    # Start-up and shutdown.

    async def start(self) -> None:
        """Before connecting: end what expired while the agent was down, then reconcile the
        enforcers with the table."""
        meta = await self._store.meta()
        wall = self._clock.now()
        if meta.last_wall_at is not None and meta.last_wall_at > wall + CLOCK_SLACK:
            # The clock went back while the agent was down (a bad RTC, a reboot with a wrong
            # clock): no lease deadline can be trusted. Everything managed goes; new grants wait
            # for the coordinator's time.
            log.warning("wall clock is behind the last time seen: clock untrusted")
            self._clock_untrusted = True
        self._time = FailClosedTime(
            wall=wall, mono=self._clock.monotonic(), floor=meta.last_wall_at
        )
        self._last_applied_seq = meta.last_applied_seq
        self._epoch = meta.epoch
        # Until the link reaches the coordinator, it has been out of reach since the last contact.
        self._offline_since = meta.last_contact_at
        async with self._lock:
            if self._clock_untrusted:
                await self._end_everything(
                    reason="clock_untrusted",
                    event=new_event(
                        EventKind.CLOCK_UNTRUSTED,
                        at=self.now(),
                        details={
                            "wall": wall.isoformat(),
                            "last_seen": meta.last_wall_at.isoformat() if meta.last_wall_at else "",
                        },
                    ),
                )
            await self._adopt_applied()
            await self._sweep(while_down=True)
            await self._reconcile()

    async def _adopt_applied(self) -> None:
        """A crash between an apply and its record leaves access in force for a lease the table
        still shows as not applied: record it as applied instead of applying it a second time."""
        now = self.now()
        waiting = [
            lease
            for lease in await self._store.active_leases()
            if lease.applied_at is None and lease.allows(now)
        ]
        if not waiting or not self._enforcers.enforcers:
            return
        seen: set[Pair] | None = None
        for enforcer in self._enforcers.enforcers:
            try:
                observed = await enforcer.observe()
            except EnforcerError:
                return  # cannot see: apply again (idempotent) rather than guess
            seen = observed if seen is None else seen & observed
        for lease in waiting:
            if seen and lease.pair in seen:
                await self._store.mark_applied(lease.grant_id, now)
                log.info("found applied at start", extra=_lease_fields(lease))

    async def _end_everything(self, *, reason: str, event: OutboxEvent) -> None:
        """Fail closed: end every active lease and take its access away."""
        now = self.now()
        active = await self._store.active_leases()
        failures = await self._enforce([lease for lease in active if lease.holds], ending=active)
        for lease in active:
            if lease.pair in failures.remove:
                self._pending_removals[lease.pair] = lease.grant_id
            await self._store.end_lease(
                lease.ended(at=now, reason=reason),
                new_event(EventKind.GRANT_REMOVED, at=now, lease=lease, details={"reason": reason}),
            )
        await self._store.add_event(event)
        self.outbox_changed.set()

    async def coordinator_time_seen(self, at: datetime) -> None:
        """The coordinator's clock (from a Welcome): time never runs behind it, and a clock
        found untrusted at start is trusted again."""
        if self._time is None:
            return
        # Skew: the agent's wall clock against the coordinator's, at every Welcome. A clock behind
        # is corrected (time never runs behind the coordinator's, and runs on the monotonic clock
        # from there); a clock ahead cannot be (time never goes back), so grants are refused
        # until a Welcome agrees again. Both are audited.
        wall = self._clock.now()
        skew_ms = int((wall - at).total_seconds() * 1000)
        self._time.raise_to(at, mono=self._clock.monotonic())
        was = self._skewed
        self._skewed = self._skew is not None and self.now() - at > self._skew
        if self._skew is not None and abs(wall - at) > self._skew:
            with _best_effort("a clock event"):
                await self._store.add_event(
                    new_event(
                        EventKind.CLOCK_SKEWED,
                        at=self.now(),
                        details={"skew_ms": str(skew_ms), "refusing": str(self._skewed).lower()},
                    )
                )
            self.outbox_changed.set()
            log.warning("clock skew", extra={"skew_ms": skew_ms, "refusing": self._skewed})
        elif was and not self._skewed:
            with _best_effort("a clock event"):
                await self._store.add_event(
                    new_event(
                        EventKind.CLOCK_TRUSTED, at=self.now(), details={"skew_ms": str(skew_ms)}
                    )
                )
            self.outbox_changed.set()
        if self._clock_untrusted:
            self._clock_untrusted = False
            with _best_effort("the trusted clock"):
                await self._store.note_wall(self.now())
                await self._store.add_event(
                    new_event(
                        EventKind.CLOCK_TRUSTED,
                        at=self.now(),
                        details={"coordinator": at.isoformat()},
                    )
                )
            self.outbox_changed.set()
            log.info("clock trusted again: coordinator time seen")

    async def checkpoint(self) -> None:
        """Persist the time reached (and the contact, if connected), e.g. before stopping."""
        now = self.now()
        with _best_effort("the time reached"):
            await self._store.note_wall(now)
            if self._connected:
                await self._store.note_contact(now)

    # The link's view.

    async def hello_state(self) -> HelloState:
        active = await self._store.active_leases()
        return HelloState(
            self._last_applied_seq, self._epoch, tuple(lease.grant_id for lease in active)
        )

    async def note_epoch(self, epoch: int) -> None:
        if epoch > self._epoch:
            self._epoch = epoch
            with _best_effort("the epoch"):
                await self._store.note_epoch(epoch)

    async def coordinator_reached(self) -> None:
        self._connected = True
        self._offline_since = None
        with _best_effort("the contact time"):
            await self._store.note_contact(self.now())
        self._leases_changed.set()

    async def coordinator_alive(self) -> None:
        if self._connected:
            with _best_effort("the contact time"):
                await self._store.note_contact(self.now())

    async def coordinator_lost(self) -> None:
        if not self._connected:
            return
        now = self.now()
        self._connected = False
        self._offline_since = now
        with _best_effort("the contact time"):
            await self._store.note_contact(now)
        # revoke_after leases now have an earlier deadline.
        self._leases_changed.set()

    async def pending_events(self, limit: int) -> list[OutboxEvent]:
        return await self._store.pending_events(limit)

    async def events_delivered(self, event_ids: Iterable[str]) -> None:
        # Events not deleted are sent again; the coordinator stores each id once.
        with _best_effort("delivered events"):
            if await self._store.delete_events(event_ids):
                self.outbox_changed.set()

    # Commands.

    async def handle(self, command: CommandSpec) -> Ack:
        async with self._lock:
            ack = commands.screen(
                command, own_name=self.name, last_applied_seq=self._last_applied_seq
            )
            if ack is None:
                now = self.now()
                kind = command.kind
                try:
                    if isinstance(kind, GrantSpec):
                        ack = await self._grant(command, kind, now)
                    elif isinstance(kind, RevokeSpec):
                        ack = await self._revoke(command, kind, now)
                    else:
                        ack = await self._snapshot(command, kind, now)
                except StateError as exc:
                    # A full or failing disk where the command's own paths do not answer it: a
                    # failed ack, not a crash. Nothing was recorded, so the next resync after a
                    # restart starts before this command again (a refused grant excepted).
                    log.error("cannot persist a command", extra={"error": str(exc)})
                    grant_id = "" if isinstance(kind, SnapshotSpec) else kind.grant_id
                    ack = Ack(command.seq, AckStatus.FAILED, "cannot persist the command", grant_id)
        if (
            ack.status is AckStatus.FAILED
            and isinstance(command.kind, RevokeSpec)
            and self._remove_retries > 1
        ):
            ack = await self._retry_revoke(ack)
        log.info(
            "command handled",
            extra={
                "seq": ack.seq,
                "status": ack.status.value,
                "grant_id": ack.grant_id,
                "reason": ack.reason,
            },
        )
        self._leases_changed.set()
        return ack

    async def _retry_revoke(self, ack: Ack) -> Ack:
        """A revoke's removal failed: try again with jittered backoff (not holding the lock
        while waiting, so expiry goes on); after the last attempt the ack stays FAILED and the
        coordinator records REVOKE_FAILED. The sweep keeps retrying afterwards."""
        lease = await self._store.lease(ack.grant_id)
        if lease is None:
            return ack
        pair = lease.pair
        reason = ack.reason
        for attempt in range(1, self._remove_retries):
            delay = spread(self._remove_retry_base * 2.0 ** (attempt - 1), rand=self._rand())
            await self._clock.sleep(delay)
            async with self._lock:
                if pair not in self._pending_removals:
                    # The sweep's retry removed it meanwhile.
                    return Ack(ack.seq, AckStatus.APPLIED, "removed on retry", ack.grant_id)
                if pair in held_pairs(await self._store.active_leases()):
                    del self._pending_removals[pair]
                    return Ack(ack.seq, AckStatus.APPLIED, "held by another grant", ack.grant_id)
                try:
                    await self._enforcers.remove(pair)
                except EnforcerError as exc:
                    reason = _cut(f"remove failed: {exc}")
                    continue
                del self._pending_removals[pair]
                log.info("grant revoked on retry", extra=_lease_fields(lease))
                return Ack(
                    ack.seq, AckStatus.APPLIED, f"removed on attempt {attempt + 1}", ack.grant_id
                )
        now = self.now()
        await self._store.add_event(
            new_event(
                EventKind.GRANT_REVOKE_FAILED,
                at=now,
                lease=lease,
                details={"attempts": str(self._remove_retries), "reason": reason},
            )
        )
        self.outbox_changed.set()
        log.error("revoke failed after retries", extra=_lease_fields(lease))
        return Ack(
            ack.seq,
            AckStatus.FAILED,
            _cut(f"{reason} ({self._remove_retries} attempts)"),
            ack.grant_id,
        )

    async def _record(self, command: CommandSpec, writes: Sequence[Lease]) -> None:
        await self._store.record_command(seq=command.seq, epoch=command.epoch, writes=writes)
        self._last_applied_seq = command.seq
        self._epoch = max(self._epoch, command.epoch)

    async def _grant(self, command: CommandSpec, spec: GrantSpec, now: datetime) -> Ack:
        seq, grant_id = command.seq, spec.grant_id
        refusal = self._time_problem(command, now)
        if refusal is not None:
            await self._record(command, ())
            await self._store.add_event(
                new_event(
                    EventKind.GRANT_REFUSED,
                    at=now,
                    grant_id=grant_id,
                    pair=(spec.subject, spec.action),
                    details={"reason": refusal},
                )
            )
            self.outbox_changed.set()
            return Ack(seq, AckStatus.REJECTED, refusal, grant_id)
        decision = commands.decide_grant(spec, await self._store.lease(grant_id), seq=seq, now=now)
        if isinstance(decision, Refuse):
            await self._record(command, ())
            return Ack(seq, AckStatus.REJECTED, decision.reason, grant_id)
        if isinstance(decision, Keep):
            await self._record(command, ())
            return Ack(seq, AckStatus.APPLIED, "already applied", grant_id)
        lease = decision.lease
        holding = await self._holding()
        try:
            await self._record(command, (lease,))
        except StateError as exc:
            # Not persisted (a full disk): no hook runs, access never exists without its row.
            log.error("cannot persist a grant", extra={"grant_id": grant_id, "error": str(exc)})
            return Ack(seq, AckStatus.FAILED, "cannot persist the grant", grant_id)
        if not decision.new:
            return Ack(seq, AckStatus.APPLIED, "updated", grant_id)
        if not lease.allows(now):
            # not_before lies ahead: the expiry loop starts it on time.
            return Ack(seq, AckStatus.APPLIED, "scheduled", grant_id)
        crash_point("agent_after_record")
        failures = await self._enforce(holding, starting=[lease])
        reason = failures.apply.get(lease.pair)
        if reason is not None:
            await self._store.mark_failed(grant_id, now, reason)
            return Ack(seq, AckStatus.FAILED, reason, grant_id)
        crash_point("agent_after_apply")
        try:
            await self._store.mark_applied(grant_id, now)
        except StateError:
            # Applied but not recorded as applied: take it away again (fail closed).
            await self._enforce([*holding, lease], ending=[lease])
            return Ack(seq, AckStatus.FAILED, "cannot persist the grant", grant_id)
        log.info("grant applied", extra=_lease_fields(lease))
        return Ack(seq, AckStatus.APPLIED, "", grant_id)

    def _time_problem(self, command: CommandSpec, now: datetime) -> str | None:
        if self._clock_untrusted:
            return "agent clock untrusted"
        if self._skewed:
            return "clock skew beyond tolerance"
        # Issued "in the future": the agent's clock is behind the coordinator's, and its view of
        # the grant's window would last too long. (Issued long ago is not skew: a command can wait
        # in a queue or a stalled connection; an agent clock ahead only ends grants early.)
        skew = self._skew
        if skew is not None and command.issued_at is not None and command.issued_at - now > skew:
            return "clock skew beyond tolerance"
        return None

    async def _revoke(self, command: CommandSpec, spec: RevokeSpec, now: datetime) -> Ack:
        seq, grant_id = command.seq, spec.grant_id
        decision = commands.decide_revoke(spec, await self._store.lease(grant_id), seq=seq, now=now)
        if isinstance(decision, Bury):
            await self._record(command, (decision.row,))
            return Ack(seq, AckStatus.APPLIED, "unknown grant: tombstone kept", grant_id)
        if isinstance(decision, AlreadyEnded):
            await self._record(command, ())
            return Ack(seq, AckStatus.APPLIED, decision.reason, grant_id)
        holding = await self._holding()
        try:
            await self._record(command, (decision.after,))
        except StateError as exc:
            # Cannot persist the end (a full disk): take the access away all the same.
            log.error("cannot persist a revoke", extra={"grant_id": grant_id, "error": str(exc)})
            failures = await self._enforce(holding, ending=[decision.before])
            if decision.before.pair in failures.remove:
                self._pending_removals[decision.before.pair] = grant_id
            return Ack(seq, AckStatus.FAILED, "access removed; cannot persist the revoke", grant_id)
        crash_point("agent_after_revoke_record")
        failures = await self._enforce(holding, ending=[decision.before])
        crash_point("agent_after_remove")
        pair = decision.before.pair
        if pair in failures.remove:
            self._pending_removals[pair] = grant_id
            return Ack(
                seq, AckStatus.FAILED, _cut(f"remove failed: {failures.remove[pair]}"), grant_id
            )
        log.info("grant revoked", extra=_lease_fields(decision.before))
        return Ack(seq, AckStatus.APPLIED, "", grant_id)

    async def _snapshot(self, command: CommandSpec, spec: SnapshotSpec, now: datetime) -> Ack:
        active = await self._store.active_leases()
        named = {grant.grant_id for grant in spec.grants} | set(spec.tombstones)
        known = await self._store.leases(named)
        known.update({lease.grant_id: lease for lease in active})
        plan = commands.plan_snapshot(spec, known, active, seq=command.seq, now=now)
        await self._record(command, plan.writes)
        starting = [lease for lease in plan.starting if lease.allows(now)]
        failures = await self._enforce(
            [lease for lease in active if lease.holds], starting=starting, ending=plan.ending
        )
        failed: list[str] = []
        for lease in starting:
            reason = failures.apply.get(lease.pair)
            if reason is None:
                await self._store.mark_applied(lease.grant_id, now)
            else:
                failed.append(lease.grant_id)
                await self._store.mark_failed(lease.grant_id, now, reason)
        for lease in plan.ending:
            if lease.pair in failures.remove:
                self._pending_removals[lease.pair] = lease.grant_id
        summary = (
            f"held {plan.kept + len(plan.starting) - len(failed)}, ended {len(plan.ending)}, "
            f"refused {len(plan.refused)}"
        )
        if failed or failures.remove:
            problems = [*failures.apply.values(), *failures.remove.values()]
            return Ack(command.seq, AckStatus.FAILED, _cut(f"{summary}; {problems[0]}"))
        return Ack(command.seq, AckStatus.APPLIED, summary)

    # Expiry.

    async def run(self) -> None:
        """The expiry loop: sweep, then sleep until the next deadline or a change of leases."""
        while True:
            self._leases_changed.clear()
            # The deadline is absolute (taken before the sweep read the time), so time that
            # passes between the sweep and the start of the sleep is not slept again.
            started = self._clock.monotonic()
            try:
                delay = await self.sweep()
                if self._reconcile_every is not None:
                    # Drift: compare the host with the table now and then, not only at start
                    # (after the sweep, so expired access is never brought back).
                    if started - self._reconciled_at >= self._reconcile_every:
                        self._reconciled_at = started
                        async with self._lock:
                            await self._reconcile()
                    delay = min(
                        delay, max(0.0, self._reconciled_at + self._reconcile_every - started)
                    )
            except StateError as exc:
                # A full or failing disk: the sweep removes access before it records the end, so
                # expiry is still enforced; the records are tried again shortly, and the agent
                # keeps running rather than crash (and crash again at every start).
                log.error("expiry sweep cannot persist", extra={"error": str(exc)})
                delay = min(MAX_NAP, self._sweep_retry_base)
            await _sleep_or_wake(self._clock, started + delay, self._leases_changed)

    async def sweep(self) -> float:
        """Start and end what is due; returns the seconds until the next sweep is needed."""
        async with self._lock:
            return await self._sweep(while_down=False)

    async def _sweep(self, *, while_down: bool) -> float:
        now = self.now()
        active = await self._store.active_leases()
        due = expiry.due(active, now, self._offline_since)
        ending = [lease for lease, _ in due.ends]
        failures = await self._enforce(
            [lease for lease in active if lease.holds], starting=due.starts, ending=ending
        )
        events = False
        for lease in due.starts:
            reason = failures.apply.get(lease.pair)
            if reason is None:
                event = new_event(EventKind.GRANT_APPLIED, at=now, lease=lease)
                events |= await self._store.mark_applied(lease.grant_id, now, event)
                log.info("scheduled grant applied", extra=_lease_fields(lease))
            else:
                event = new_event(
                    EventKind.GRANT_APPLY_FAILED, at=now, lease=lease, details={"reason": reason}
                )
                events |= await self._store.mark_failed(lease.grant_id, now, reason, event)
        stuck: set[str] = set()
        for lease, cause in due.ends:
            if lease.holds and lease.pair in failures.remove:
                # Still in force: the lease stays active (and due) until removal succeeds.
                stuck.add(lease.grant_id)
                continue
            events |= await self._store.end_lease(
                lease.ended(at=now, reason=cause.value), _end_event(lease, cause, now, while_down)
            )
            log.info(
                "grant expired" if cause is expiry.EndCause.EXPIRED else "grant ended offline",
                extra=_lease_fields(lease),
            )
        retried_ok, retried_events = await self._retry_removals(now)
        if events or retried_events:
            self.outbox_changed.set()
        if self._wall_noted_at is None or now - self._wall_noted_at >= WALL_NOTE_EVERY:
            await self._store.note_wall(now)
            self._wall_noted_at = now

        active = await self._store.active_leases()
        remaining = [lease for lease in active if lease.grant_id not in stuck]
        wake = expiry.next_wakeup(remaining, self._offline_since)
        delay = MAX_NAP if wake is None else min(MAX_NAP, (wake - now).total_seconds())
        if stuck or not retried_ok:
            # Removals keep failing: try again after a growing, jittered delay (not in a spin).
            retry = self._sweep_retry_base * 2.0 ** min(self._retry_attempt, 16)
            delay = min(delay, spread(min(self._sweep_retry_cap, retry), rand=self._rand()))
            self._retry_attempt += 1
        else:
            self._retry_attempt = 0
        return max(0.0, delay)

    async def _retry_removals(self, now: datetime) -> tuple[bool, bool]:
        """Retry removals that failed before. Returns (all done, events written)."""
        if not self._pending_removals:
            return True, False
        held = held_pairs(await self._store.active_leases())
        ok, events = True, False
        for pair, grant_id in sorted(self._pending_removals.items()):
            if pair in held:
                # A newer lease holds the pair again: it must stay.
                del self._pending_removals[pair]
                continue
            try:
                await self._enforcers.remove(pair)
            except EnforcerError:
                ok = False
                continue
            del self._pending_removals[pair]
            await self._store.add_event(
                new_event(
                    EventKind.GRANT_REMOVED,
                    at=now,
                    pair=pair,
                    grant_id=grant_id,
                    details={"retried": "true"},
                )
            )
            events = True
            log.info(
                "removal succeeded on retry",
                extra={"grant_id": grant_id, "subject": pair[0], "action": pair[1]},
            )
        return ok, events

    # Reconcile.

    async def _reconcile(self) -> None:
        """Make each enforcer's view match the table: apply what active leases hold but the
        enforcer does not show; remove what it shows that no active lease holds."""
        now = self.now()
        active = await self._store.active_leases()
        desired = held_pairs(active)
        broken: dict[Pair, str] = {}
        events = False
        for enforcer in self._enforcers.enforcers:
            try:
                observed = await enforcer.observe()
            except EnforcerError as exc:
                # Cannot see: re-apply everything (idempotent), remove nothing.
                log.warning("observe failed", extra={"enforcer": enforcer.name, "error": str(exc)})
                observed = set()
            plan = reconcile(desired, observed)
            for subject, action in sorted(plan.apply - broken.keys()):
                try:
                    await enforcer.apply(subject, action)
                except EnforcerError as exc:
                    broken[(subject, action)] = str(exc)
                    continue
                log.info(
                    "reconcile applied",
                    extra={"enforcer": enforcer.name, "subject": subject, "action": action},
                )
            for subject, action in sorted(plan.remove):
                try:
                    await enforcer.remove(subject, action)
                except EnforcerError:
                    self._pending_removals.setdefault((subject, action), "")
                    continue
                events = True
                grant_id = self._pending_removals.pop((subject, action), "")
                if grant_id:
                    # A revoke whose removal had failed: done now, and reported as such (the
                    # coordinator moves REVOKE_FAILED to REVOKED on this event).
                    await self._store.add_event(
                        new_event(
                            EventKind.GRANT_REMOVED,
                            at=now,
                            pair=(subject, action),
                            grant_id=grant_id,
                            details={"retried": "true", "enforcer": enforcer.name},
                        )
                    )
                    continue
                await self._store.add_event(
                    new_event(
                        EventKind.DRIFT_REMOVED,
                        at=now,
                        pair=(subject, action),
                        details={"enforcer": enforcer.name},
                    )
                )
                log.warning(
                    "reconcile removed access no lease holds",
                    extra={"enforcer": enforcer.name, "subject": subject, "action": action},
                )
        # All or nothing: a pair one enforcer cannot apply is taken away from all of them, and
        # the leases that held it have failed.
        for pair, reason in sorted(broken.items()):
            try:
                await self._enforcers.remove(pair)
            except EnforcerError:
                self._pending_removals[pair] = ""
            for lease in active:
                if lease.holds and lease.pair == pair:
                    event = new_event(
                        EventKind.GRANT_APPLY_FAILED,
                        at=now,
                        lease=lease,
                        details={"reason": reason, "while": "reconcile"},
                    )
                    events |= await self._store.mark_failed(lease.grant_id, now, reason, event)
        if events:
            self.outbox_changed.set()

    # Enforcement.

    async def _holding(self) -> list[Lease]:
        return [lease for lease in await self._store.active_leases() if lease.holds]

    async def _enforce(
        self,
        holding: Sequence[Lease],
        *,
        starting: Sequence[Lease] = (),
        ending: Sequence[Lease] = (),
    ) -> _Failures:
        """Apply and remove the pairs that starting and ending leases change (ref-counted)."""
        changes = pair_changes(holding, starting=starting, ending=ending)
        apply_failed: dict[Pair, str] = {}
        for pair in sorted(changes.apply):
            try:
                await self._enforcers.apply(pair)
            except EnforcerError as exc:
                apply_failed[pair] = _cut(str(exc))
                if isinstance(exc, ApplyFailed) and not exc.rolled_back:
                    self._pending_removals[pair] = ""
                log.warning(
                    "apply failed", extra={"subject": pair[0], "action": pair[1], "error": str(exc)}
                )
        if apply_failed:
            # Leases that failed to start hold nothing: recount before removing.
            started = [lease for lease in starting if lease.pair not in apply_failed]
            changes = pair_changes(holding, starting=started, ending=ending)
        remove_failed: dict[Pair, str] = {}
        for pair in sorted(changes.remove):
            try:
                await self._enforcers.remove(pair)
            except EnforcerError as exc:
                remove_failed[pair] = _cut(str(exc))
        return _Failures(apply_failed, remove_failed)


def _end_event(
    lease: Lease, cause: expiry.EndCause, now: datetime, while_down: bool
) -> OutboxEvent:
    details = {"while": "down"} if while_down else {}
    if cause is expiry.EndCause.OFFLINE:
        details["reason"] = "offline"
        return new_event(EventKind.GRANT_REMOVED, at=now, lease=lease, details=details)
    return new_event(EventKind.GRANT_EXPIRED, at=now, lease=lease, details=details)


def _lease_fields(lease: Lease) -> dict[str, str]:
    return {"grant_id": lease.grant_id, "subject": lease.subject, "action": lease.action}


@contextlib.contextmanager
def _best_effort(what: str) -> Iterator[None]:
    """Bookkeeping a full or failing disk must not turn into a crash: logged and skipped (the
    next write of the same kind tries again)."""
    try:
        yield
    except StateError as exc:
        log.error("cannot persist %s", what, extra={"error": str(exc)})


def _cut(text: str) -> str:
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


async def _sleep_or_wake(clock: Clock, until: float, wake: asyncio.Event) -> None:
    """Sleep on `clock` (a fake one in tests) until its monotonic time reaches `until`, or
    until `wake` is set."""
    if wake.is_set():
        return
    sleeper = asyncio.ensure_future(_sleep_until(clock, until))
    waiter = asyncio.ensure_future(wake.wait())
    try:
        await asyncio.wait((sleeper, waiter), return_when=asyncio.FIRST_COMPLETED)
    finally:
        sleeper.cancel()
        waiter.cancel()
        await asyncio.gather(sleeper, waiter, return_exceptions=True)


async def _sleep_until(clock: Clock, until: float) -> None:
    # Read the clock when the sleep starts, not when it was asked for.
    await clock.sleep(until - clock.monotonic())
