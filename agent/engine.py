"""The agent's core: applies commands, starts and ends leases on time, reconciles the host.

Every change to the lease table and the host goes through here, one at a time (one lock): command
handling, the expiry sweep and the start-up reconcile. For each command: validate, persist (one
transaction), enforce (reference-counted), then answer with the ack. The table is the truth; the
expiry loop's timers are derived from it on every pass.

A removal that fails after its lease ended (a revoke, a snapshot, a fail-closed start) becomes a
pending removal (`agent.domain.removals`), persisted with its attempts and next retry time. The
revoke is acked FAILED at once (the coordinator shows REVOKE_FAILED) and the next commands go on;
a retry loop beside the expiry loop retries in the background, running the hook outside the
lock. A retry that succeeds reports the grants removed (`grant.removed`, retried=true: the
coordinator moves them to REVOKED); when the attempts run out they are reported
`grant.revoke_failed` once and retried every `cap` seconds, across restarts. Ordering: while a
pair's removal runs in the background, commands and expiries that touch that pair wait for it
(others do not); a pending pair that a newer lease holds again is parked, never removed under
that lease, and reported removed once the holder's own end really removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
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
from agent.domain.coverage import DriftMode, held_pairs, pair_changes, reconcile
from agent.domain.errors import ApplyFailed, EnforcerError, StateError
from agent.domain.leases import EventKind, Lease, LeaseState, OutboxEvent, Pair, new_event
from agent.domain.removals import (
    Removal,
    RetryPolicy,
    failed_again,
    first_failure,
    is_due,
    needs_report,
)
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
        """`remove_retries`: attempts at a revoke's removal before its grant is reported
        `grant.revoke_failed`, `remove_retry_base` apart, doubling, +-50 % (the revoke itself is
        acked FAILED after the first, inline, attempt; REVOKED follows a removal that worked).
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
        # Pairs whose removal failed after their lease had already ended (revoke, snapshot, a
        # failed rollback, drift): a copy of the store's pending removals, retried in the
        # background by the retry loop until they succeed.
        self._pending: dict[Pair, Removal] = {}
        # Background removals running now (outside the lock), by pair.
        self._removing: dict[Pair, asyncio.Task[None]] = {}
        self._removals_changed = asyncio.Event()
        # Report-only drift already audited, by (enforcer, pair), until it is gone.
        self._drift_reported: set[tuple[str, Pair]] = set()
        # Expiry ends whose removal failed (the lease stays active): the sweep's own retries.
        self._retry_attempt = 0
        self._wall_noted_at: datetime | None = None
        # A revoke's attempts (the first inline, the others in the background), then REVOKE_FAILED
        # and a retry every base * 2^retries, at most every 10 minutes (PROMISES.md).
        self._policy = RetryPolicy.from_settings(remove_retries, remove_retry_base)
        # When the expiry loop's last sweep planned to look again (engine time).
        self._next_sweep_at: datetime | None = None
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
        # Removals still owed from before the restart: retried at once (in the background, by
        # `run`), then on their schedule.
        self._pending = {
            removal.pair: replace(removal, next_at=wall) for removal in await self._store.removals()
        }
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
            await self._store.end_lease(
                lease.ended(at=now, reason=reason),
                new_event(EventKind.GRANT_REMOVED, at=now, lease=lease, details={"reason": reason}),
            )
        for pair, error in sorted(failures.remove.items()):
            await self._pend(
                pair, [lease.grant_id for lease in active if lease.pair == pair], error
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
        async with self._exclusive(command):
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
            elif ack.status is AckStatus.APPLIED and isinstance(command.kind, RevokeSpec):
                # A revoke sent again (its ack was lost): never "done" while its removal is owed.
                ack = self._still_owed(ack) or ack
        log.info(
            "command handled",
            extra={
                "seq": ack.seq,
                "status": ack.status.value,
                "grant_id": ack.grant_id,
                "reason": ack.reason,
            },
        )
        if self._expiry_must_look(command, ack):
            self._leases_changed.set()
        return ack

    def _expiry_must_look(self, command: CommandSpec, ack: Ack) -> bool:
        """Whether the expiry loop must sweep before the wake it planned. Not for a grant that
        was applied (or scheduled) and whose start and end both lie beyond that wake: the usual
        case, where a sweep after every command would cost a table read and task churn on the
        push path for nothing. Always for anything else."""
        kind = command.kind
        planned = self._next_sweep_at
        if (
            planned is None
            or ack.status is not AckStatus.APPLIED
            or not isinstance(kind, GrantSpec)
        ):
            return True
        now = self.now()
        next_deadline = kind.not_before if kind.not_before > now else kind.not_after
        return next_deadline <= planned

    async def _pairs_of(self, command: CommandSpec) -> Collection[Pair] | None:
        """The pairs a command may change on the host (None: any, for a snapshot)."""
        kind = command.kind
        if isinstance(kind, GrantSpec):
            return {(kind.subject, kind.action)}
        if isinstance(kind, RevokeSpec):
            lease = await self._store.lease(kind.grant_id)
            return set() if lease is None else {lease.pair}
        return None

    @contextlib.asynccontextmanager
    async def _exclusive(self, command: CommandSpec) -> AsyncIterator[None]:
        """The engine lock, taken when no background removal of a pair `command` may change is
        running: a command for a pair waits for that pair's hook, never for another one's."""
        while True:
            await self._lock.acquire()
            if not self._removing:
                break  # the usual case: nothing to look up
            pairs = await self._pairs_of(command)
            busy = [task for pair, task in self._removing.items() if pairs is None or pair in pairs]
            if not busy:
                break
            self._lock.release()
            await asyncio.wait(busy)
        try:
            yield
        finally:
            self._lock.release()

    def _still_owed(self, ack: Ack) -> Ack | None:
        """A FAILED ack if the grant's removal is still pending."""
        for removal in self._pending.values():
            if ack.grant_id and ack.grant_id in removal.grant_ids:
                return Ack(
                    ack.seq,
                    AckStatus.FAILED,
                    _cut(f"removal pending: {removal.error}"),
                    ack.grant_id,
                )
        return None

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
        starts_now = decision.new and lease.allows(now)
        if starts_now:
            # Written as applied in the command's own transaction: one commit per grant, none
            # after the enforcer. A crash between the commit and the enforcer leaves the row
            # ahead of the host; the start-up reconcile applies what active leases hold and the
            # host lacks, before the agent connects again.
            lease = replace(lease, applied_at=now)
        holding = await self._holding()
        try:
            await self._record(command, (lease,))
        except StateError as exc:
            # Not persisted (a full disk): no hook runs, access never exists without its row.
            log.error("cannot persist a grant", extra={"grant_id": grant_id, "error": str(exc)})
            return Ack(seq, AckStatus.FAILED, "cannot persist the grant", grant_id)
        if not decision.new:
            return Ack(seq, AckStatus.APPLIED, "updated", grant_id)
        if not starts_now:
            # not_before lies ahead: the expiry loop starts it on time.
            return Ack(seq, AckStatus.APPLIED, "scheduled", grant_id)
        crash_point("agent_after_record")
        failures = await self._enforce(holding, starting=[lease])
        reason = failures.apply.get(lease.pair)
        if reason is not None:
            await self._apply_failed(lease, now, reason)
            return Ack(seq, AckStatus.FAILED, reason, grant_id)
        crash_point("agent_after_apply")
        log.info("grant applied", extra=_lease_fields(lease))
        return Ack(seq, AckStatus.APPLIED, "", grant_id)

    async def _apply_failed(self, lease: Lease, now: datetime, reason: str) -> None:
        """A grant's row, written as applied before its hook, whose apply failed: the row must
        end (fail closed), or a reconcile would later apply access the coordinator was told
        failed. A table that takes no write (a full disk) gets the end in its journal; if even
        that fails, StateError: the command is acked FAILED."""
        try:
            await self._store.mark_failed(lease.grant_id, now, reason)
        except StateError as exc:
            log.error(
                "cannot record a failed grant in the table",
                extra={"grant_id": lease.grant_id, "error": str(exc)},
            )
            await self._store.end_lease(lease.ended(at=now, reason=reason, state=LeaseState.FAILED))

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
            ack = Ack(seq, AckStatus.APPLIED, decision.reason, grant_id)
            return self._still_owed(ack) or ack
        holding = await self._holding()
        pair = decision.before.pair
        journaled = False
        try:
            await self._record(command, (decision.after,))
        except StateError as exc:
            # Cannot persist the end in the table (a full disk): the store keeps it in its
            # revoke journal (the lease is ended from now on, across restarts), and the access
            # goes all the same.
            log.error("cannot persist a revoke", extra={"grant_id": grant_id, "error": str(exc)})
            try:
                journaled = await self._store.end_lease(decision.after)
            except StateError as again:
                log.error(
                    "cannot journal a revoke", extra={"grant_id": grant_id, "error": str(again)}
                )
            failures = await self._enforce(holding, ending=[decision.before])
            if pair in failures.remove:
                await self._pend(pair, [grant_id], failures.remove[pair])
                reason = _cut(f"remove failed (retrying): {failures.remove[pair]}")
                return Ack(seq, AckStatus.FAILED, reason, grant_id)
            if not journaled:
                reason = "access removed; cannot persist the revoke"
                return Ack(seq, AckStatus.FAILED, reason, grant_id)
            reason = "access removed; lease table full, revoke kept in the journal"
            return Ack(seq, AckStatus.APPLIED, reason, grant_id)
        crash_point("agent_after_revoke_record")
        failures = await self._enforce(holding, ending=[decision.before])
        crash_point("agent_after_remove")
        if pair in failures.remove:
            # Acked FAILED now (REVOKE_FAILED on the coordinator); retried in the background.
            await self._pend(pair, [grant_id], failures.remove[pair])
            return Ack(
                seq,
                AckStatus.FAILED,
                _cut(f"remove failed (retrying): {failures.remove[pair]}"),
                grant_id,
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
        for pair, error in sorted(failures.remove.items()):
            ended = [lease.grant_id for lease in plan.ending if lease.pair == pair]
            await self._pend(pair, ended, error)
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
        """The expiry loop (sweep, then sleep until the next deadline or a change of leases) and,
        beside it, the loop retrying pending removals in the background."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._retry_loop(tasks))
                await self._expiry_loop()
        except BaseExceptionGroup as group:
            # One failure (a lease table that cannot be read) surfaces as itself, as before.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def _expiry_loop(self) -> None:
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
                        await self.reconcile()
                    delay = min(
                        delay, max(0.0, self._reconciled_at + self._reconcile_every - started)
                    )
            except StateError as exc:
                # A full or failing disk: the sweep removes access before it records the end, so
                # expiry is still enforced; the records are tried again shortly, and the agent
                # keeps running rather than crash (and crash again at every start).
                log.error("expiry sweep cannot persist", extra={"error": str(exc)})
                delay = min(MAX_NAP, self._policy.base)
                # No plan: every command wakes the loop until a sweep makes one again.
                self._next_sweep_at = None
            await _sleep_or_wake(self._clock, started + delay, self._leases_changed)

    async def sweep(self) -> float:
        """Start and end what is due; returns the seconds until the next sweep is needed."""
        async with self._lock:
            return await self._sweep(while_down=False)

    async def _sweep(self, *, while_down: bool) -> float:
        now = self.now()
        active = await self._store.active_leases()
        due = expiry.due(active, now, self._offline_since)
        # A pair whose removal runs in the background waits for it (the loop is woken when it
        # ends): an apply or remove now could cross it.
        busy = set(self._removing)
        starts = [lease for lease in due.starts if lease.pair not in busy]
        ends = [(lease, cause) for lease, cause in due.ends if lease.pair not in busy]
        waiting = {lease.grant_id for lease in due.starts if lease.pair in busy}
        waiting |= {lease.grant_id for lease, _ in due.ends if lease.pair in busy}
        failures = await self._enforce(
            [lease for lease in active if lease.holds],
            starting=starts,
            ending=[lease for lease, _ in ends],
        )
        events = False
        for lease in starts:
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
        for lease, cause in ends:
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
        if events:
            self.outbox_changed.set()
        if self._wall_noted_at is None or now - self._wall_noted_at >= WALL_NOTE_EVERY:
            await self._store.note_wall(now)
            self._wall_noted_at = now

        active = await self._store.active_leases()
        remaining = [lease for lease in active if lease.grant_id not in stuck | waiting]
        wake = expiry.next_wakeup(remaining, self._offline_since)
        delay = MAX_NAP if wake is None else min(MAX_NAP, (wake - now).total_seconds())
        if stuck:
            # Removals keep failing: try again after a growing, jittered delay (not in a spin).
            retry = self._policy.base * 2.0 ** min(self._retry_attempt, 16)
            delay = min(delay, spread(min(self._policy.cap, retry), rand=self._rand()))
            self._retry_attempt += 1
        else:
            self._retry_attempt = 0
        delay = max(0.0, delay)
        self._next_sweep_at = now + timedelta(seconds=delay)
        return delay

    # Pending removals.

    async def _pend(self, pair: Pair, grant_ids: Iterable[str], error: str) -> None:
        """A removal of `pair` failed after its leases ended: persist it for the retry loop
        (merged into one already pending for the pair)."""
        now = self.now()
        removal = first_failure(
            pair,
            tuple(grant_ids),
            now=now,
            error=_cut(error),
            policy=self._policy,
            rand=self._rand(),
            existing=self._pending.get(pair),
        )
        await self._keep_pending(removal, now)
        log.warning(
            "removal pending",
            extra={"subject": pair[0], "action": pair[1], "attempts": removal.attempts},
        )

    async def _keep_pending(self, removal: Removal, now: datetime) -> None:
        events: list[OutboxEvent] = []
        if needs_report(removal, self._policy):
            # The attempts ran out: REVOKE_FAILED, reported once (and the retries go on).
            removal = replace(removal, reported=True)
            events = [
                new_event(
                    EventKind.GRANT_REVOKE_FAILED,
                    at=now,
                    pair=removal.pair,
                    grant_id=grant_id,
                    details={"attempts": str(removal.attempts), "reason": removal.error},
                )
                for grant_id in removal.grant_ids
            ]
            log.error(
                "revoke failed after retries",
                extra={"subject": removal.pair[0], "action": removal.pair[1]},
            )
        self._pending[removal.pair] = removal
        try:
            await self._store.save_removal(removal, events)
        except StateError as exc:
            # Kept in memory (retried all the same); the store journals what it can.
            log.error("cannot persist a pending removal", extra={"error": str(exc)})
        if events:
            self.outbox_changed.set()
        self._removals_changed.set()

    async def _removed(self, pair: Pair, now: datetime) -> None:
        """`pair` was really removed: a removal pending for it is done; its grants are reported
        removed (the coordinator moves REVOKE_FAILED to REVOKED on these events)."""
        removal = self._pending.pop(pair, None)
        if removal is None:
            return
        events = [
            new_event(
                EventKind.GRANT_REMOVED,
                at=now,
                pair=pair,
                grant_id=grant_id,
                details={"retried": "true", "attempts": str(removal.attempts + 1)},
            )
            for grant_id in removal.grant_ids
        ]
        try:
            await self._store.drop_removal(pair, events)
        except StateError as exc:
            # Not recorded: keep it owed, so the (idempotent) removal and its report are tried
            # again rather than lost.
            log.error("cannot record a removal", extra={"error": str(exc)})
            self._pending[pair] = replace(removal, next_at=now)
            self._removals_changed.set()
            return
        if events:
            self.outbox_changed.set()
        log.info(
            "pending removal done",
            extra={"subject": pair[0], "action": pair[1], "grant_ids": ",".join(removal.grant_ids)},
        )

    async def _retry_loop(self, tasks: asyncio.TaskGroup) -> None:
        """Start each due pending removal as its own background task (the hook runs without
        the lock); sleep until the next one is due or the set changes."""
        while True:
            self._removals_changed.clear()
            delay = self._policy.cap
            async with self._lock:
                now = self.now()
                held = held_pairs(await self._store.active_leases())
                for pair, removal in sorted(self._pending.items()):
                    if pair in self._removing or pair in held:
                        # Running already; or a newer lease holds the pair again (parked: its
                        # own end removes it, and completes this one).
                        continue
                    if is_due(removal, now, policy=self._policy):
                        self._removing[pair] = tasks.create_task(self._retry_removal(pair))
                    else:
                        delay = min(delay, (removal.next_at - now).total_seconds())
            await _sleep_or_wake(
                self._clock, self._clock.monotonic() + max(0.0, delay), self._removals_changed
            )

    async def _retry_removal(self, pair: Pair) -> None:
        try:
            error = ""
            try:
                await self._enforcers.remove(pair)
            except EnforcerError as exc:
                error = _cut(str(exc))
            async with self._lock:
                now = self.now()
                removal = self._pending.get(pair)
                if removal is not None and not error:
                    await self._removed(pair, now)
                elif removal is not None:
                    again = failed_again(
                        removal, now=now, error=error, policy=self._policy, rand=self._rand()
                    )
                    await self._keep_pending(again, now)
                del self._removing[pair]
        finally:
            self._removing.pop(pair, None)
            self._removals_changed.set()
            self._leases_changed.set()

    # Reconcile.

    async def reconcile(self) -> None:
        """Compare the host with the lease table now (drift)."""
        async with self._lock:
            await self._reconcile()

    async def _reconcile(self) -> None:
        """Make each enforcer's view match the table: apply what active leases hold but the
        enforcer does not show; remove (or, for a report-only enforcer, audit) what it shows that
        no active lease holds. Pairs with a pending removal are the retry loop's, not drift."""
        now = self.now()
        active = await self._store.active_leases()
        desired = held_pairs(active)
        owed = set(self._pending) | set(self._removing)
        broken: dict[Pair, str] = {}
        events = False
        for enforcer, mode in zip(self._enforcers.enforcers, self._enforcers.drift, strict=True):
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
            drift = plan.remove - owed
            if mode is DriftMode.REPORT:
                events |= await self._report_drift(enforcer.name, drift, now)
                continue
            for subject, action in sorted(drift):
                try:
                    await enforcer.remove(subject, action)
                except EnforcerError as exc:
                    await self._pend((subject, action), (), str(exc))
                    continue
                events = True
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
            except EnforcerError as exc:
                await self._pend(pair, (), str(exc))
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

    async def _report_drift(self, enforcer: str, drift: frozenset[Pair], now: datetime) -> bool:
        """Report-only drift: audit each pair once (until it is gone), change nothing."""
        known = {pair for name, pair in self._drift_reported if name == enforcer}
        self._drift_reported -= {(enforcer, pair) for pair in known - drift}
        new = sorted(drift - known)
        for subject, action in new:
            await self._store.add_event(
                new_event(
                    EventKind.DRIFT_REPORTED,
                    at=now,
                    pair=(subject, action),
                    details={"enforcer": enforcer},
                )
            )
            self._drift_reported.add((enforcer, (subject, action)))
            log.warning(
                "reconcile found access no lease holds (report only: left in place)",
                extra={"enforcer": enforcer, "subject": subject, "action": action},
            )
        return bool(new)

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
        unrolled: set[Pair] = set()
        for pair in sorted(changes.apply):
            try:
                await self._enforcers.apply(pair)
            except EnforcerError as exc:
                apply_failed[pair] = _cut(str(exc))
                if isinstance(exc, ApplyFailed) and not exc.rolled_back:
                    # Partly in place: keep trying to take it away.
                    unrolled.add(pair)
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
                continue
            # A removal owed for an earlier end of this pair (parked while a newer lease held
            # it) is done now too.
            await self._removed(pair, self.now())
        for pair, error in apply_failed.items():
            if pair in unrolled:
                await self._pend(pair, (), error)
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
