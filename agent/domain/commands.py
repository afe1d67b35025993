"""What a command from the coordinator does to the lease set.

Order of judgement for every command: is it addressed to this agent and internally consistent
(`screen`); is it a duplicate of one already applied (`screen`); then what its kind does to the
leases it names (`decide_grant`, `decide_revoke`, `plan_snapshot`). Grants are idempotent by grant
id, and a tombstone beats a late grant with the same id.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from jitmesh.durations import MAX_DURATION
from jitmesh.types import OfflinePolicy

from .breakglass import KeptLock
from .leases import HOLD, Lease, LeaseState, tombstone


class AckStatus(enum.StrEnum):
    APPLIED = "APPLIED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    # This very command (same seq) was handled and answered before (docs/wire.md, "Acks").
    DUPLICATE = "DUPLICATE"
    # At or below the last applied seq, but a later snapshot replaced it: not vouched for.
    NOT_APPLIED = "NOT_APPLIED"


class RevokeReason(enum.StrEnum):
    REVOKED = "revoked"
    RELEASED = "released"
    EXPIRED = "expired"
    AGENT_REMOVED = "agent_removed"


@dataclass(frozen=True, slots=True)
class GrantSpec:
    grant_id: str
    subject: str
    action: str
    not_before: datetime
    not_after: datetime
    offline: OfflinePolicy = HOLD
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class RevokeSpec:
    grant_id: str
    reason: RevokeReason = RevokeReason.REVOKED


@dataclass(frozen=True, slots=True)
class SnapshotSpec:
    """The complete set of grants the agent should hold."""

    grants: tuple[GrantSpec, ...]
    tombstones: tuple[str, ...] = ()
    # Every lock in force for this agent (the kept locks are replaced by them); None: a
    # snapshot that says nothing of locks (the kept ones stay).
    locks: tuple[KeptLock, ...] | None = None


@dataclass(frozen=True, slots=True)
class LockSpec:
    """Keep a lock (LockCommand): matching grants and break-glass codes are refused here."""

    lock: KeptLock


@dataclass(frozen=True, slots=True)
class UnlockSpec:
    lock_id: str


@dataclass(frozen=True, slots=True)
class CommandSpec:
    seq: int
    # What the signed body says: who it is for and which sequence number it was issued with.
    agent: str
    body_seq: int
    epoch: int
    kind: GrantSpec | RevokeSpec | SnapshotSpec | LockSpec | UnlockSpec
    # When the coordinator issued (or re-sent) it, by the coordinator's clock.
    issued_at: datetime | None = None
    # The coordinator replica that signed it ("" from a 0.1 coordinator): for the log only,
    # never for a decision (docs/wire.md, "Epoch, generation and replicas").
    replica: str = ""


@dataclass(frozen=True, slots=True)
class GrantResult:
    """One grant's (or tombstone's) outcome in a snapshot's ack."""

    grant_id: str
    status: AckStatus
    reason: str = ""
    applied_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    status: AckStatus
    reason: str = ""
    grant_id: str = ""
    # For a snapshot: one result per grant and per tombstone it named.
    results: tuple[GrantResult, ...] = ()


def screen(
    command: CommandSpec, *, own_name: str, last_applied_seq: int, snapshot_seq: int = 0
) -> Ack | None:
    """Checks that need no lease: the answer when the command stops here, else None.

    Refusals here change nothing, not even the last applied sequence number: a command meant for
    another agent must not let a replay move this agent's log position. A command at or below
    the last applied seq was handled before (DUPLICATE), unless the last snapshot, applied after
    it, replaced what it did (NOT_APPLIED): commands are applied in seq order, so everything
    between the snapshot and the last applied seq was handled one by one.
    """
    grant_id = command.kind.grant_id if isinstance(command.kind, GrantSpec | RevokeSpec) else ""
    if command.agent != own_name:
        return Ack(command.seq, AckStatus.REJECTED, "not for this agent", grant_id)
    if command.body_seq != command.seq:
        return Ack(command.seq, AckStatus.REJECTED, "sequence number mismatch", grant_id)
    # A snapshot replaces everything, so it is never a duplicate, even with a lower number.
    # (Lock commands are numbered like any other and screened the same way.)
    if not isinstance(command.kind, SnapshotSpec) and command.seq <= last_applied_seq:
        if command.seq < snapshot_seq:
            return Ack(
                command.seq,
                AckStatus.NOT_APPLIED,
                f"replaced by snapshot {snapshot_seq}",
                grant_id,
            )
        return Ack(command.seq, AckStatus.DUPLICATE, "", grant_id)
    return None


# Grants.


@dataclass(frozen=True, slots=True)
class Refuse:
    """Acked REJECTED; nothing changes but the last applied sequence number."""

    reason: str


@dataclass(frozen=True, slots=True)
class Keep:
    """Already held with the same terms: acked APPLIED, no side effect."""

    lease: Lease


@dataclass(frozen=True, slots=True)
class Write:
    """Persist `lease`. `new` leases still have to start; otherwise only the deadline changed."""

    lease: Lease
    new: bool


GrantDecision = Refuse | Keep | Write


def window_problem(spec: GrantSpec, now: datetime) -> str | None:
    if spec.not_after <= spec.not_before:
        return "empty time window"
    if spec.not_after <= now:
        return "expired on arrival"
    # A grant with no meaningful end is refused rather than treated as forever.
    if spec.not_after - now > MAX_DURATION:
        return "not_after too far in the future"
    return None


def decide_grant(
    spec: GrantSpec, existing: Lease | None, *, seq: int, now: datetime
) -> GrantDecision:
    if existing is None:
        problem = window_problem(spec, now)
        if problem:
            return Refuse(problem)
        return Write(lease_from(spec, seq=seq), new=True)
    if existing.state is LeaseState.TOMBSTONE:
        return Refuse("tombstoned")
    if existing.state is not LeaseState.ACTIVE:
        return Refuse("grant already ended")
    if existing.pair != (spec.subject, spec.action):
        return Refuse("grant id already used for another subject or action")
    # The same grant again with other terms (an extension, or a shorter end) changes the deadline
    # and the offline policy only: the pair is already applied, or its start is already scheduled.
    if spec.not_after - now > MAX_DURATION:
        return Refuse("not_after too far in the future")
    if existing.not_after == spec.not_after and existing.offline == spec.offline:
        return Keep(existing)
    return Write(replace(existing, not_after=spec.not_after, offline=spec.offline, seq=seq), False)


def lease_from(spec: GrantSpec, *, seq: int) -> Lease:
    return Lease(
        grant_id=spec.grant_id,
        subject=spec.subject,
        action=spec.action,
        not_before=spec.not_before,
        not_after=spec.not_after,
        state=LeaseState.ACTIVE,
        seq=seq,
        request_id=spec.request_id,
        offline=spec.offline,
    )


# Revokes.


@dataclass(frozen=True, slots=True)
class End:
    """An active lease ends: `after` is the row to persist; its pair goes unless others hold it."""

    before: Lease
    after: Lease


@dataclass(frozen=True, slots=True)
class Bury:
    """Unknown grant id: leave a tombstone so a late grant with this id is refused."""

    row: Lease


@dataclass(frozen=True, slots=True)
class AlreadyEnded:
    reason: str


RevokeDecision = End | Bury | AlreadyEnded


def decide_revoke(
    spec: RevokeSpec, existing: Lease | None, *, seq: int, now: datetime
) -> RevokeDecision:
    if existing is None:
        return Bury(tombstone(spec.grant_id, seq=seq, at=now, reason=spec.reason.value))
    if existing.state is LeaseState.ACTIVE:
        after = replace(existing.ended(at=now, reason=spec.reason.value), seq=seq)
        return End(existing, after)
    return AlreadyEnded("tombstoned" if existing.state is LeaseState.TOMBSTONE else "already ended")


# Snapshots.


@dataclass(frozen=True, slots=True)
class SnapshotPlan:
    # Rows to persist, in one transaction with the snapshot's sequence number.
    writes: tuple[Lease, ...]
    # New leases (also in `writes`) that start now or at their not_before.
    starting: tuple[Lease, ...]
    # Active leases the snapshot ends, as they were before (their ended rows are in `writes`).
    ending: tuple[Lease, ...]
    # Grant ids of the snapshot that are not applied, with the reason.
    refused: tuple[tuple[str, str], ...]
    # Leases the snapshot keeps as they are (or with a new deadline).
    kept: int


def plan_snapshot(
    spec: SnapshotSpec,
    known: Mapping[str, Lease],
    active: Collection[Lease],
    *,
    seq: int,
    now: datetime,
) -> SnapshotPlan:
    """`known`: the stored leases with the ids the snapshot names; `active`: all active leases.

    The snapshot is the whole truth about what to hold; what it does not name ends (reason
    "snapshot"). Local tombstones are kept even when the snapshot does not list them: a tombstone
    only ever refuses access, so keeping it cannot grant anything.
    """
    wanted = {grant.grant_id: grant for grant in spec.grants}
    buried = set(spec.tombstones)
    writes: list[Lease] = []
    starting: list[Lease] = []
    ending: list[Lease] = []
    refused: list[tuple[str, str]] = []
    kept = 0

    for lease in active:
        if lease.grant_id in buried:
            ending.append(lease)
            writes.append(
                replace(
                    lease.ended(at=now, reason="revoked", state=LeaseState.TOMBSTONE),
                    seq=seq,
                )
            )
        elif lease.grant_id not in wanted:
            ending.append(lease)
            writes.append(replace(lease.ended(at=now, reason="snapshot"), seq=seq))

    for grant_id in sorted(buried):
        if grant_id not in known:
            writes.append(tombstone(grant_id, seq=seq, at=now, reason="revoked"))

    for grant_id, grant in wanted.items():
        if grant_id in buried:
            refused.append((grant_id, "tombstoned"))
            continue
        decision = decide_grant(grant, known.get(grant_id), seq=seq, now=now)
        if isinstance(decision, Refuse):
            refused.append((grant_id, decision.reason))
        elif isinstance(decision, Keep):
            kept += 1
        else:
            writes.append(decision.lease)
            if decision.new:
                starting.append(decision.lease)
            else:
                kept += 1

    return SnapshotPlan(tuple(writes), tuple(starting), tuple(ending), tuple(refused), kept)
