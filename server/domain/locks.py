"""Locks: the emergency stop. A lock names a subject, an agent, an action or a combination of
them. Creating one ends, in one transaction, everything it matches: live grants move to REVOKING
with one revoke command each in their agents' logs (pushed to every agent at once after the
commit), pending requests are denied. Every agent the lock concerns (its agent, or all of them)
also gets a lock command to keep (wire 0.2; a 0.1 agent gets only the revokes), so that it
refuses matching grants and break-glass codes itself, also while cut off; lifting the lock sends
the unlock. While the lock is in force, new requests and approvals it
matches are refused (checked inside the approving transaction, so an approval cannot slip in
between). A lock ends when an admin lifts it or at its optional expiry.

A lock that names no agent concerns the whole fleet: its lock commands are handed out after
that transaction, in steps of HANDOUT_BATCH agents, one short write transaction each, so
that the one writer (SQLite) or the audit head (PostgreSQL) is never held for the whole fleet
(10,000 agents in one transaction held it for about a second: docs/performance.md, scenario 20).
What the lock promises does not wait for the handout: the lock row, the revokes and the denials
commit first, every approval checks the lock row, and a snapshot carries the locks in force.
Where the handout stands is stored with the lock (`handout_after`) and moved in each step's own
transaction, so a coordinator stopped half-way finishes it when it starts again (`run`), and two
callers stepping the same lock (the creator and `run`, or two replicas) never write an agent's
command twice. Its unlock commands are written in the lift's own transaction (`lock_commands`
says why). Agents the handout cannot reach (enrolled later, or upgraded from 0.1) get the locks
in force when they are enrolled (their version recorded): `locks_for_agent`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import partial

from jitmesh import validation as v
from jitmesh.clock import Clock, rfc3339
from jitmesh.types import Agent, Lock, LockTarget, Request, RequestState
from jitmesh.versions import older_than

from .errors import (
    Conflict,
    InvalidArgument,
    Locked,
    NotFound,
    PermissionDenied,
    invalid_input,
)
from .grants import end_grants
from .hub import Hub
from .lifecycle import ENDABLE_GRANT_STATES
from .models import AuditEntry, AuditKind, Command, CommandKind, Principal, new_id
from .ports import CommandSink, Store, Tx

log = logging.getLogger(__name__)

MAX_LOCK_TTL = timedelta(days=366)
# Agents per handout step: a step of 1,000 holds the writer for 1/10 of a 10,000-agent lock
# (docs/performance.md, scenario 20).
HANDOUT_BATCH = 1000
# How often `run` looks for handouts left unfinished (by a coordinator that stopped half-way).
HANDOUT_CHECK = timedelta(minutes=1)


class LockService:
    def __init__(
        self,
        store: Store,
        links: CommandSink,
        hub: Hub,
        clock: Clock,
        batch: int = HANDOUT_BATCH,
        check_every: timedelta = HANDOUT_CHECK,
    ) -> None:
        self._store = store
        self._links = links
        self._hub = hub
        self._clock = clock
        self._batch = batch
        self._check_every = check_every

    async def create(
        self,
        principal: Principal,
        target: LockTarget,
        reason: str,
        ttl: timedelta | None,
    ) -> tuple[Lock, int, int]:
        """Lock the target; returns the lock, the grants revoked and the requests denied."""
        _require_admin(principal)
        target = checked_target(target)
        with invalid_input():
            v.check_reason(reason)
        if not reason.strip():
            raise InvalidArgument("a lock needs a reason")
        if ttl is not None and not timedelta(seconds=1) <= ttl <= MAX_LOCK_TTL:
            raise InvalidArgument("lock ttl must be between 1s and 366d")
        now = self._clock.now()
        lock = Lock(
            id=new_id("lck"),
            target=target,
            reason=reason,
            created_by=principal.name,
            created_at=now,
            expires_at=None if ttl is None else now + ttl,
        )
        how = f"locked: {lock.id}"
        async with self._store.transaction() as tx:
            await tx.insert_lock(lock)
            await tx.audit(_lock_entry(AuditKind.LOCK_CREATED, principal.name, lock, now))
            grants = await tx.locked_grants(target, ENDABLE_GRANT_STATES)
            ending, commands = await end_grants(
                tx,
                grants,
                now,
                by=principal.name,
                end_reason=how,
                kind=AuditKind.GRANT_REVOKING,
                details={"reason": reason, "lock": lock.id},
            )
            entries = []
            denied = []
            for request in await tx.locked_requests(target):
                if await tx.decide_request(
                    request.id,
                    expected=RequestState.PENDING,
                    state=RequestState.DENIED,
                    at=now,
                    by=principal.name,
                    reason=how,
                ):
                    denied.append(request.id)
                    entries.append(
                        AuditEntry(
                            AuditKind.REQUEST_DENIED,
                            principal.name,
                            now,
                            subject=request.subject,
                            agent=request.agent,
                            request_id=request.id,
                            details={"action": request.action, "why": how},
                        )
                    )
            await tx.audit_many(entries)
            commands += await lock_commands(tx, lock, CommandKind.LOCK, now)
        self._links.push(commands)
        self._hub.requests_changed([g.request_id for g in ending] + denied)
        await self._hub.audit_written(tx.new_audit)
        if not target.agent:
            await self._hand_out_or_leave(lock.id)
        return lock, len(ending), len(denied)

    async def lift(self, principal: Principal, lock_id: str, reason: str) -> Lock:
        _require_admin(principal)
        with invalid_input():
            v.check_id(lock_id, "lock")
            v.check_reason(reason)
        now = self._clock.now()
        async with self._store.transaction() as tx:
            # Held until commit: a handout step of this lock waits for the lift, then finds
            # the handout done (`lock_commands`).
            lock = await tx.hold_lock(lock_id)
            if lock is None:
                raise NotFound("no such lock")
            if lock.lifted_at is not None:
                raise Conflict("lock was lifted already")
            await tx.lift_lock(lock_id, now, principal.name, reason)
            lifted = await tx.get_lock(lock_id)
            assert lifted is not None
            await tx.audit(_lock_entry(AuditKind.LOCK_LIFTED, principal.name, lifted, now, reason))
            commands = await lock_commands(tx, lifted, CommandKind.UNLOCK, now)
        self._links.push(commands)
        await self._hub.audit_written(tx.new_audit)
        return lifted

    async def _hand_out_or_leave(self, lock_id: str) -> None:
        """Hand the commands out now; if the store fails half-way, the lock (or its lifting) is
        committed all the same, and `run` finishes the handout at its next pass."""
        try:
            await self.hand_out(lock_id)
        except Exception as exc:  # any store failure: `run` goes on from where it stopped
            log.warning(
                "lock command handout stopped half-way, finished by the next pass: %s",
                type(exc).__name__,
                extra={"lock": lock_id},
            )

    async def hand_out(self, lock_id: str) -> None:
        """Step the lock's command handout until it is done (nothing to do when it is)."""
        while True:
            step = partial(handout_step, lock_id=lock_id, now=self._clock.now(), batch=self._batch)
            commands, done = await self._store.write(step)
            self._links.push(commands)
            if done:
                return

    async def finish_handouts(self) -> None:
        """Finish every handout left unfinished (by a coordinator stopped half-way)."""
        for lock_id in await self._store.locks_handing_out():
            await self.hand_out(lock_id)

    async def run(self) -> None:
        """At start and every `check_every`: finish what a stopped coordinator left; a failing
        pass (the store away for a moment) is tried again at the next."""
        while True:
            try:
                await self.finish_handouts()
            except Exception as exc:  # any store failure: the next pass tries again
                log.warning("lock command handout failed: %s", type(exc).__name__)
            await self._clock.sleep(self._check_every.total_seconds())

    async def list(self, principal: Principal, *, include_ended: bool) -> list[Lock]:
        _require_admin(principal)  # locks.proto: admins only (a lock names who is suspected)
        return await self._store.list_locks(include_ended=include_ended, now=self._clock.now())


def keeps_locks(agent: Agent) -> bool:
    """Whether the agent understands lock commands: wire 0.2 and later, or not known yet (never
    said Hello since the coordinator was upgraded: taken to be of this release until it says)."""
    return keeps_locks_at(agent.version)


def keeps_locks_at(version: str) -> bool:
    """`keeps_locks` for a version as recorded ("": not known yet)."""
    return not version or not older_than(version, 0, 2)


async def settle_unsent(
    tx: Tx, agent: str, version: str, last_applied_seq: int, now: datetime
) -> None:
    """Settle the lock commands in the log of an agent that has just said it is `version` and
    keeps no locks (0.1): written while it was recorded as keeping them (its version not known
    yet, or a newer agent rolled back), they are never sent to it now (it cannot read them; the
    lock's revokes are sent as for any agent). Each is marked NOT_APPLIED with why (its agent
    acknowledged nothing: its last acked seq stays), so nothing waits on it: the agent's resume
    point no longer stops before it, and retention drops it with the next command the agent
    acknowledges.

    Those above the Hello's `last_applied_seq` were not sent (audited `lock.not_sent`); those at
    or below it reached the agent before it was rolled back (it applied them, its ack was lost)
    and are audited `lock.not_acknowledged`: the agent it is now keeps no locks."""
    unsent = await tx.unacked_lock_commands(agent)
    if not unsent:
        return
    not_sent = f"not sent: agent {version} keeps no locks (the lock's revokes are sent)"
    applied = (
        f"not acknowledged: applied by the agent up to seq {last_applied_seq} before it was "
        f"rolled back; agent now {version} keeps no locks (the lock's revokes are sent)"
    )
    groups = [
        (AuditKind.LOCK_NOT_SENT, not_sent, [c for c in unsent if c.seq > last_applied_seq]),
        (
            AuditKind.LOCK_NOT_ACKNOWLEDGED,
            applied,
            [c for c in unsent if c.seq <= last_applied_seq],
        ),
    ]
    for kind, why, commands in groups:
        if not commands:
            continue
        settled = set(await tx.settle_unsent(agent, [c.seq for c in commands], now, why))
        await tx.audit_many(
            [
                AuditEntry(
                    kind,
                    "coordinator",
                    now,
                    subject=c.lock.target.subject,
                    agent=agent,
                    details={
                        "lock": c.lock.id,
                        "command": c.kind.value,
                        "seq": str(c.seq),
                        "version": version,
                        "why": why,
                    },
                )
                for c in commands
                if c.lock is not None and c.seq in settled
            ]
        )


async def locks_for_agent(tx: Tx, agent: str, now: datetime) -> list[Command]:
    """LOCK commands, in the agent's log, for the locks in force that concern it (the whole
    fleet, or it by name): for an agent just enrolled, or one that has just said it keeps
    locks (0.1 upgraded to 0.2). Neither would get them otherwise: a lock's handout went by
    before it (or passes its name later only if it is ahead of the handout's position), and no
    lock command is written for a 0.1 agent. In the transaction that enrolls the agent (or
    records its version), so a lock created at the same moment either sees the agent (and
    hands it out) or is seen here. A second LOCK of the same lock (the handout reaching it
    after all) is kept in place by the agent: no harm."""
    kept = [
        lock
        for lock in await tx.locks_in_force(now)
        if not lock.target.agent or lock.target.agent == agent
    ]
    commands: list[Command] = []
    for lock in kept:
        commands += await _append(tx, lock, CommandKind.LOCK, [agent], now)
    return commands


async def lock_commands(tx: Tx, lock: Lock, kind: CommandKind, now: datetime) -> list[Command]:
    """For a lock that names an agent: a LOCK (or UNLOCK) command in that agent's log when it
    keeps locks; the commands to push once committed. For one that names none (the whole
    fleet): its LOCK handout is started from the first agent (`handout_step` writes them); its
    UNLOCK goes to every agent that keeps locks here, in the lift's own transaction.

    Why the unlock is not handed out in steps: the coordinator approves grants the lock matched
    as soon as the lift commits, and a grant command written for an agent the handout had not
    reached would come before that agent's unlock: the agent, still keeping the lock, would
    refuse it (the grant FAILED, by our own ordering), and a break-glass code too. Written here,
    every later command comes after the unlock. The cost is the lift's transaction (about as long
    as a whole-fleet lock's was in one: docs/performance.md, scenario 20); lifts are rare. A lock
    is the other way round: until a step reaches an agent, the coordinator refuses what the lock
    matches (the approving transaction reads the lock row), so no grant can overtake it.
    A lift half-way through the LOCK handout ends it (`handout_after` NULL): agents the handout
    never reached are told to forget an unknown lock, which they take as done."""
    if not lock.target.agent:
        if kind is CommandKind.LOCK:
            await tx.set_lock_handout(lock.id, "")
            return []
        await tx.set_lock_handout(lock.id, None)
        names: list[str] = []
        after = ""
        while True:
            agents = await tx.agents_after(after, HANDOUT_BATCH)
            names += [name for name, version in agents if keeps_locks_at(version)]
            if len(agents) < HANDOUT_BATCH:
                break
            after = agents[-1][0]
        return await _append(tx, lock, kind, names, now)
    agent = await tx.get_agent(lock.target.agent)
    if agent is None or not keeps_locks(agent):
        return []
    return await _append(tx, lock, kind, [agent.name], now)


async def handout_step(
    tx: Tx, lock_id: str, now: datetime, batch: int
) -> tuple[list[Command], bool]:
    """One step of a whole-fleet lock's handout: the lock's command (LOCK while it is not
    lifted, UNLOCK once it is) for the next `batch` agents after where the handout stands,
    then the handout moved on (or marked done). The commands to push, and whether it is done.
    A lift writes every UNLOCK in its own transaction and ends the handout (`lock_commands`);
    a step finds UNLOCK to hand out only for a lift committed by a release that stepped it."""
    # The lock row first, held until commit: a lift of it waits for this step (or this step
    # for the lift, and then finds the handout done).
    lock = await tx.hold_lock(lock_id)
    after = await tx.lock_handout(lock_id)
    if after is None or lock is None:
        return [], True
    kind = CommandKind.UNLOCK if lock.lifted_at is not None else CommandKind.LOCK
    agents = await tx.agents_after(after, batch)
    done = len(agents) < batch
    await tx.set_lock_handout(lock_id, None if done else agents[-1][0])
    names = [name for name, version in agents if keeps_locks_at(version)]
    return await _append(tx, lock, kind, names, now), done


async def _append(
    tx: Tx, lock: Lock, kind: CommandKind, agents: list[str], now: datetime
) -> list[Command]:
    seqs = await tx.append_commands([(name, kind, lock.id, now) for name in agents])
    return [
        Command(name, seq, kind, None, lock=lock)
        for name, seq in zip(agents, seqs, strict=True)
        if seq is not None
    ]


async def refuse_if_locked(
    store: Store | Tx, subject: str, agent: str, action: str, now: datetime
) -> None:
    """Raise Locked when a lock in force matches: new requests and approvals are refused."""
    lock = await store.lock_in_force(subject, agent, action, now)
    if lock is not None:
        raise lock_refusal(lock)


def lock_refusal(lock: Lock) -> Locked:
    """The refusal for anything a lock in force stops (one wording, one reason: LOCKED)."""
    return Locked(
        f"{lock.target.describe()} is locked ({lock.id}): {lock.reason}; an admin lifts it "
        f"with 'jitctl lock lift {lock.id}'"
    )


def first_lock(locks: Sequence[Lock], request: Request) -> Lock | None:
    """The first of `locks` (all in force) that matches the request's subject, agent, action."""
    subject = request.subject.lower()
    for lock in locks:
        if lock.target.matches(subject, request.agent, request.action):
            return lock
    return None


def first_lock_at(
    locks: Sequence[Lock], subject: str, agent: str, action: str, now: datetime
) -> Lock | None:
    """The first of `locks` in force at `now` that matches the subject (in any case), agent and
    action: as `Store.lock_in_force`, from a list read once for several callers."""
    subject = subject.lower()
    for lock in locks:
        if lock.in_force(now) and lock.target.matches(subject, agent, action):
            return lock
    return None


def checked_target(target: LockTarget) -> LockTarget:
    if not (target.subject or target.agent or target.action):
        raise InvalidArgument("a lock needs a subject, an agent or an action")
    with invalid_input():
        if target.subject:
            v.check(v.SUBJECT, target.subject, "subject")
        if target.agent:
            v.check(v.AGENT, target.agent, "agent")
        if target.action:
            v.check(v.ACTION, target.action, "action")
    # Subjects are one person whatever their case: locks match them case-folded.
    return LockTarget(subject=target.subject.lower(), agent=target.agent, action=target.action)


def _lock_entry(
    kind: AuditKind, actor: str, lock: Lock, now: datetime, lift_reason: str = ""
) -> AuditEntry:
    details = {"lock": lock.id, "target": lock.target.describe(), "reason": lock.reason}
    if lock.expires_at is not None:
        details["expires_at"] = rfc3339(lock.expires_at)
    if lift_reason:
        details["lift_reason"] = lift_reason
    return AuditEntry(
        kind,
        actor,
        now,
        subject=lock.target.subject,
        agent=lock.target.agent,
        details=details,
    )


def _require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise PermissionDenied("only admins may create or lift locks")
