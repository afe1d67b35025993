"""Commands from the coordinator: validate, persist (one transaction), enforce (ref-counted),
then answer with the ack.

A command for a pair whose removal runs in the background waits for that removal (never for
another pair's). A revoke whose removal fails is acked FAILED at once (the coordinator shows
REVOKE_FAILED) and handed to the removal retries; the next commands go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import replace
from datetime import datetime

from agent.domain import commands
from agent.domain.breakglass import KeptLock, LockChange, first_lock
from agent.domain.commands import (
    Ack,
    AckStatus,
    AlreadyEnded,
    Bury,
    CommandSpec,
    GrantResult,
    GrantSpec,
    Keep,
    LockSpec,
    Refuse,
    RevokeSpec,
    SnapshotSpec,
    UnlockSpec,
    Write,
)
from agent.domain.errors import StateError
from agent.domain.leases import EventKind, Lease, LeaseState, Pair, new_event
from agent.domain.steps import Step, StepHook, no_hook
from agent.engine.clocktrust import ClockTrust
from agent.engine.enforcement import Enforcement, Failures
from agent.engine.expiry import Expiry
from agent.engine.linkstate import LinkState
from agent.engine.removals import Removals
from agent.engine.shared import Shared, cut, lease_fields
from agent.store.base import LeaseStore
from jitmesh import telemetry

log = logging.getLogger(__name__)


class Commands:
    def __init__(
        self,
        *,
        name: str,
        store: LeaseStore,
        shared: Shared,
        time: ClockTrust,
        link: LinkState,
        enforcement: Enforcement,
        removals: Removals,
        expiry: Expiry,
        step: StepHook = no_hook,
    ) -> None:
        self._name = name
        # Told each step of an apply and a revoke (the fault suite's crash points).
        self._step = step
        self._store = store
        self._shared = shared
        self._time = time
        self._link = link
        self._enforcement = enforcement
        self._removals = removals
        self._expiry = expiry
        # The kept locks (LockCommand), read from the table once and then kept in step with
        # every command that changes them: a grant is checked against them on the push path.
        self._locks: list[KeptLock] | None = None

    async def handle(self, command: CommandSpec) -> Ack:
        async with self._exclusive(command):
            ack = commands.screen(
                command,
                own_name=self._name,
                last_applied_seq=self._link.last_applied_seq,
                snapshot_seq=self._link.snapshot_seq,
            )
            if ack is None:
                now = self._time.now()
                kind = command.kind
                try:
                    if isinstance(kind, GrantSpec):
                        ack = await self._grant(command, kind, now)
                    elif isinstance(kind, RevokeSpec):
                        ack = await self._revoke(command, kind, now)
                    elif isinstance(kind, LockSpec | UnlockSpec):
                        ack = await self._lock(command, kind)
                    else:
                        ack = await self._snapshot(command, kind, now)
                except StateError as exc:
                    # A full or failing disk where the command's own paths do not answer it: a
                    # failed ack, not a crash. Nothing was recorded, so the next resync after a
                    # restart starts before this command again (a refused grant excepted).
                    log.error("cannot persist a command", extra={"error": str(exc)})
                    grant_id = kind.grant_id if isinstance(kind, GrantSpec | RevokeSpec) else ""
                    ack = Ack(command.seq, AckStatus.FAILED, "cannot persist the command", grant_id)
            elif ack.status is AckStatus.DUPLICATE and isinstance(command.kind, RevokeSpec):
                # A revoke sent again (its ack was lost): never "done" while its removal is owed.
                ack = self._removals.still_owed(ack) or await self._as_handled(ack, revoke=True)
            elif ack.status is AckStatus.DUPLICATE:
                ack = await self._as_handled(ack, revoke=False)
        log.info(
            "command handled",
            extra={
                "seq": ack.seq,
                "status": ack.status.value,
                "grant_id": ack.grant_id,
                "reason": ack.reason,
                telemetry.REPLICA: command.replica,
            },
        )
        if self._expiry.must_look(command, ack):
            self._shared.leases_changed.set()
        return ack

    async def handle_many(self, batch: Sequence[CommandSpec]) -> list[Ack]:
        """`handle` for commands received together, in order, with the same acks as one by one.
        A run of grants that start now is persisted in one commit (their leases and the last
        seq) and applied together (one enforcer call per pair); anything else (revokes,
        snapshots, extensions, refusals, grants that start later) goes through `handle`."""
        acks: list[Ack] = []
        k = 0
        while k < len(batch):
            done = await self._grant_run(batch[k:]) if len(batch) - k > 1 else []
            if not done:
                acks.append(await self.handle(batch[k]))
                k += 1
                continue
            acks.extend(done)
            k += len(done)
        return acks

    async def _grant_run(self, batch: Sequence[CommandSpec]) -> list[Ack]:
        """The acks of the longest run of new grants that start now at the head of `batch`,
        persisted in one commit and applied (empty: the first command is not one; `handle`
        takes it). Promises as for one grant: the rows are committed (as applied) before any
        hook runs, a failed apply ends its row, and the acks leave only after both."""
        lock = self._shared.lock
        await lock.acquire()
        try:
            if self._removals.removing:
                return []  # a background removal may hold a pair: one by one, as `handle` waits
            now = self._time.now()
            last = self._link.last_applied_seq
            run: list[tuple[CommandSpec, Lease]] = []
            for command in batch:
                taken = {lease.grant_id for _, lease in run}
                lease = await self._starts_now(command, last, now, taken)
                if lease is None:
                    break
                run.append((command, lease))
                last = command.seq
            if len(run) < 2:
                return []
            leases = [lease for _, lease in run]
            holding = await self._enforcement.holding(lease.pair for lease in leases)
            epoch = max(command.epoch for command, _ in run)
            try:
                await self._store.record_command(seq=last, epoch=epoch, writes=leases)
            except StateError:
                return []  # one by one: each answers its own failure
            self._link.applied(last, epoch)
            self._step(Step.AFTER_RECORD)
            failures = await self._enforcement.enforce(holding, starting=leases)
            acks: list[Ack] = []
            for command, lease in run:
                reason = failures.apply.get(lease.pair)
                if reason is not None:
                    try:
                        await self._apply_failed(lease, now, reason)
                    except StateError as exc:
                        log.error("cannot persist a command", extra={"error": str(exc)})
                        reason = "cannot persist the command"
                    acks.append(Ack(command.seq, AckStatus.FAILED, reason, lease.grant_id))
                else:
                    log.info("grant applied", extra=lease_fields(lease))
                    acks.append(Ack(command.seq, AckStatus.APPLIED, "", lease.grant_id))
            self._step(Step.AFTER_APPLY)
        finally:
            lock.release()
        look = False
        for (command, _), ack in zip(run, acks, strict=True):
            log.info(
                "command handled",
                extra={
                    "seq": ack.seq,
                    "status": ack.status.value,
                    "grant_id": ack.grant_id,
                    telemetry.REPLICA: command.replica,
                },
            )
            look = look or self._expiry.must_look(command, ack)
        if look:
            self._shared.leases_changed.set()
        return acks

    async def _starts_now(
        self, command: CommandSpec, last: int, now: datetime, taken: Collection[str]
    ) -> Lease | None:
        """The lease of a new grant `handle` would persist as applied and enforce at once
        (with `last` as the last applied seq); None for any other command."""
        spec = command.kind
        if not isinstance(spec, GrantSpec) or spec.grant_id in taken:
            return None
        if command.seq != last + 1 or commands.screen(
            command,
            own_name=self._name,
            last_applied_seq=last,
            snapshot_seq=self._link.snapshot_seq,
        ):
            return None
        if self._time.grant_problem(command, now) is not None:
            return None
        if first_lock(await self.kept_locks(), spec.subject, spec.action, now) is not None:
            return None  # refused one by one, by `handle`
        decision = commands.decide_grant(
            spec, await self._store.lease(spec.grant_id), seq=command.seq, now=now
        )
        if not isinstance(decision, Write) or not decision.new or not decision.lease.allows(now):
            return None
        return replace(decision.lease, applied_at=now)

    async def _as_handled(self, ack: Ack, *, revoke: bool) -> Ack:
        """A duplicate carries what became of its grant here, as a snapshot result would: the
        coordinator books it only if the first ack was lost (docs/wire.md, "Acks"). For a
        revoke: done (its removal is not owed, else the ack is FAILED)."""
        if not ack.grant_id:
            return ack
        lease = await self._store.lease(ack.grant_id)
        if revoke:
            if lease is not None and lease.state is LeaseState.ACTIVE:
                return ack
            return replace(ack, results=(GrantResult(ack.grant_id, AckStatus.APPLIED),))
        if lease is None or lease.state is LeaseState.TOMBSTONE:
            result = GrantResult(ack.grant_id, AckStatus.REJECTED, "not applied here")
        elif lease.state is LeaseState.FAILED:
            result = GrantResult(ack.grant_id, AckStatus.FAILED, "apply failed")
        elif lease.state is LeaseState.ACTIVE or lease.applied_at is not None:
            result = GrantResult(ack.grant_id, AckStatus.APPLIED, "", lease.applied_at)
        else:
            result = GrantResult(ack.grant_id, AckStatus.REJECTED, "not applied here")
        return replace(ack, results=(result,))

    async def kept_locks(self) -> list[KeptLock]:
        if self._locks is None:
            self._locks = await self._store.locks()
        return self._locks

    async def _lock(self, command: CommandSpec, spec: LockSpec | UnlockSpec) -> Ack:
        """Keep or forget a lock: no access changes here (the lock's revokes come as revoke
        commands); grants and break-glass codes it matches are refused while it holds."""
        if isinstance(spec, LockSpec):
            change = LockChange(put=(spec.lock,))
        else:
            change = LockChange(drop=(spec.lock_id,))
        await self._record(command, (), locks=change)
        self._locks = await self._store.locks()
        lock_id = spec.lock.lock_id if isinstance(spec, LockSpec) else spec.lock_id
        log.info(
            "lock kept" if isinstance(spec, LockSpec) else "lock lifted", extra={"lock": lock_id}
        )
        return Ack(command.seq, AckStatus.APPLIED, "locked" if isinstance(spec, LockSpec) else "")

    async def _pairs_of(self, command: CommandSpec) -> Collection[Pair] | None:
        """The pairs a command may change on the host (None: any, for a snapshot)."""
        kind = command.kind
        if isinstance(kind, LockSpec | UnlockSpec):
            return set()
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
        lock = self._shared.lock
        removing = self._removals.removing
        while True:
            await lock.acquire()
            if not removing:
                break  # the usual case: nothing to look up
            pairs = await self._pairs_of(command)
            busy = [task for pair, task in removing.items() if pairs is None or pair in pairs]
            if not busy:
                break
            lock.release()
            await asyncio.wait(busy)
        try:
            yield
        finally:
            lock.release()

    async def _record(
        self, command: CommandSpec, writes: Sequence[Lease], locks: LockChange | None = None
    ) -> None:
        snapshot = isinstance(command.kind, SnapshotSpec)
        await self._store.record_command(
            seq=command.seq, epoch=command.epoch, writes=writes, snapshot=snapshot, locks=locks
        )
        self._link.applied(command.seq, command.epoch, snapshot=snapshot)

    async def _grant(self, command: CommandSpec, spec: GrantSpec, now: datetime) -> Ack:
        seq, grant_id = command.seq, spec.grant_id
        refusal = self._time.grant_problem(command, now)
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
            self._shared.outbox_changed.set()
            return Ack(seq, AckStatus.REJECTED, refusal, grant_id)
        existing = await self._store.lease(grant_id)
        lock = first_lock(await self.kept_locks(), spec.subject, spec.action, now)
        if lock is not None and existing is None:
            # A lock this agent keeps matches: no new access for it (docs/wire.md).
            await self._record(command, ())
            return Ack(seq, AckStatus.REJECTED, cut(f"locked ({lock.lock_id})"), grant_id)
        decision = commands.decide_grant(spec, existing, seq=seq, now=now)
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
        holding = await self._enforcement.holding([lease.pair])
        try:
            await self._record(command, (lease,))
        except StateError as exc:
            # Not persisted (a full disk): no hook runs, access never exists without its row.
            log.error("cannot persist a grant", extra={"grant_id": grant_id, "error": str(exc)})
            return Ack(seq, AckStatus.FAILED, "cannot persist the grant", grant_id)
        if not decision.new:
            if lease.holds:
                # The same grant with another not_after (an extension): the host's deadline
                # follows; nothing is applied a second time.
                await self._enforcement.moved([lease.pair])
            return Ack(seq, AckStatus.APPLIED, "updated", grant_id)
        if not starts_now:
            # not_before lies ahead: the expiry loop starts it on time.
            return Ack(seq, AckStatus.APPLIED, "scheduled", grant_id)
        self._step(Step.AFTER_RECORD)
        failures = await self._enforcement.enforce(holding, starting=[lease])
        reason = failures.apply.get(lease.pair)
        if reason is not None:
            await self._apply_failed(lease, now, reason)
            return Ack(seq, AckStatus.FAILED, reason, grant_id)
        self._step(Step.AFTER_APPLY)
        log.info("grant applied", extra=lease_fields(lease))
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

    async def _revoke(self, command: CommandSpec, spec: RevokeSpec, now: datetime) -> Ack:
        seq, grant_id = command.seq, spec.grant_id
        decision = commands.decide_revoke(spec, await self._store.lease(grant_id), seq=seq, now=now)
        if isinstance(decision, Bury):
            await self._record(command, (decision.row,))
            return Ack(seq, AckStatus.APPLIED, "unknown grant: tombstone kept", grant_id)
        if isinstance(decision, AlreadyEnded):
            await self._record(command, ())
            ack = Ack(seq, AckStatus.APPLIED, decision.reason, grant_id)
            return self._removals.still_owed(ack) or ack
        pair = decision.before.pair
        holding = await self._enforcement.holding([pair])
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
            failures = await self._enforcement.enforce(
                holding, ending=[decision.before], cause=spec.reason.value
            )
            if pair in failures.remove:
                await self._removals.pend(pair, [grant_id], failures.remove[pair])
                reason = cut(f"remove failed (retrying): {failures.remove[pair]}")
                return Ack(seq, AckStatus.FAILED, reason, grant_id)
            if not journaled:
                reason = "access removed; cannot persist the revoke"
                return Ack(seq, AckStatus.FAILED, reason, grant_id)
            reason = "access removed; lease table full, revoke kept in the journal"
            return Ack(seq, AckStatus.APPLIED, reason, grant_id)
        self._step(Step.AFTER_REVOKE_RECORD)
        failures = await self._enforcement.enforce(
            holding, ending=[decision.before], cause=spec.reason.value
        )
        self._step(Step.AFTER_REMOVE)
        if pair in failures.remove:
            # Acked FAILED now (REVOKE_FAILED on the coordinator); retried in the background.
            await self._removals.pend(pair, [grant_id], failures.remove[pair])
            return Ack(
                seq,
                AckStatus.FAILED,
                cut(f"remove failed (retrying): {failures.remove[pair]}"),
                grant_id,
            )
        log.info("grant revoked", extra=lease_fields(decision.before))
        return Ack(seq, AckStatus.APPLIED, "", grant_id)

    async def _snapshot(self, command: CommandSpec, spec: SnapshotSpec, now: datetime) -> Ack:
        active = await self._store.active_leases()
        named = {grant.grant_id for grant in spec.grants} | set(spec.tombstones)
        known = await self._store.leases(named)
        known.update({lease.grant_id: lease for lease in active})
        plan = commands.plan_snapshot(spec, known, active, seq=command.seq, now=now)
        locks = None if spec.locks is None else LockChange(put=spec.locks, replace=True)
        await self._record(command, plan.writes, locks=locks)
        if locks is not None:
            self._locks = list(spec.locks or ())
        starting = [lease for lease in plan.starting if lease.allows(now)]
        failures = await self._enforcement.enforce(
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
            await self._removals.pend(pair, ended, error)
        summary = (
            f"held {plan.kept + len(plan.starting) - len(failed)}, ended {len(plan.ending)}, "
            f"refused {len(plan.refused)}"
        )
        results = await self._results(spec, plan, failures, failed, now)
        if failed or failures.remove:
            problems = [*failures.apply.values(), *failures.remove.values()]
            return Ack(
                command.seq, AckStatus.FAILED, cut(f"{summary}; {problems[0]}"), results=results
            )
        return Ack(command.seq, AckStatus.APPLIED, summary, results=results)

    async def _results(
        self,
        spec: SnapshotSpec,
        plan: commands.SnapshotPlan,
        failures: Failures,
        failed: Sequence[str],
        now: datetime,
    ) -> tuple[GrantResult, ...]:
        """One result per grant and tombstone the snapshot named (docs/wire.md): what the
        coordinator books each of them by."""
        refused = dict(plan.refused)
        leases = await self._store.leases([g.grant_id for g in spec.grants] + list(spec.tombstones))
        results: list[GrantResult] = []
        for grant in spec.grants:
            gid = grant.grant_id
            if gid in refused:
                results.append(GrantResult(gid, AckStatus.REJECTED, cut(refused[gid])))
            elif gid in failed:
                reason = failures.apply.get((grant.subject, grant.action), "apply failed")
                results.append(GrantResult(gid, AckStatus.FAILED, cut(reason)))
            else:
                lease = leases.get(gid)
                applied_at = lease.applied_at if lease is not None else None
                results.append(GrantResult(gid, AckStatus.APPLIED, "", applied_at))
        failing = {
            lease.grant_id: failures.remove[lease.pair]
            for lease in plan.ending
            if lease.pair in failures.remove
        }
        for gid in spec.tombstones:
            if gid in failing:
                reason = cut(f"remove failed (retrying): {failing[gid]}")
                results.append(GrantResult(gid, AckStatus.FAILED, reason))
            else:
                results.append(GrantResult(gid, AckStatus.APPLIED))
        return tuple(results)
