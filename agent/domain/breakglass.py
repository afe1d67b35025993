"""Break-glass on the host, and the locks the coordinator keeps here (docs/wire.md).

A code is checked by the link's edge (signature under a pinned key: `agent.rpc.breakglass`;
the keys it may be signed by: `code_keys`); what it may then do is decided here, from the code,
the caller, the kept locks and the time alone:
`decide_use` answers a refusal (said to the caller, never echoing the code) or the lease the
agent grants itself. A code makes at most one lease, `bg-<code id>`, for at most the agent's own
cap, and never after the code's `expires_at`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from .leases import HOLD, Lease, LeaseState

GRANT_PREFIX = "bg-"


@dataclass(frozen=True, slots=True)
class Code:
    """What a verified code allows (BreakglassGrant)."""

    code_id: str
    agent: str
    subject: str
    action: str
    duration: timedelta
    issued_at: datetime
    expires_at: datetime
    issued_by: str
    # The whole signed code as presented (serialized BreakglassCode), reported to the
    # coordinator, which verifies it again.
    raw: bytes


@dataclass(frozen=True, slots=True)
class KeptLock:
    """A lock the coordinator sent (LockCommand). Empty subject or action matches any."""

    lock_id: str
    subject: str = ""
    action: str = ""
    expires_at: datetime | None = None
    reason: str = ""

    def in_force(self, now: datetime) -> bool:
        return self.expires_at is None or now < self.expires_at

    def matches(self, subject: str, action: str, now: datetime) -> bool:
        """Subjects match case-folded (the coordinator keeps lock subjects lower-case)."""
        return (
            self.in_force(now)
            and (not self.subject or self.subject == subject.lower())
            and (not self.action or self.action == action)
        )


@dataclass(frozen=True, slots=True)
class Use:
    """A code used on this host: the lease it made, and who presented it."""

    code_id: str
    grant_id: str
    code: bytes
    subject: str
    action: str
    caller: str
    used_at: datetime
    not_after: datetime


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str


@dataclass(frozen=True, slots=True)
class BreakglassKey:
    """A retired command-signing key the coordinator announced for break-glass codes only
    (Welcome.breakglass_keys): it verifies codes until `not_after`, never a command."""

    public_key: bytes
    not_after: datetime


def code_keys(
    command_keys: Mapping[str, bytes], breakglass_keys: Mapping[str, BreakglassKey], now: datetime
) -> dict[str, bytes]:
    """The keys a code may be signed by at `now`: the command-signing keys pinned now, and the
    break-glass keys whose `not_after` is still ahead by this host's clock."""
    keys = {kid: key.public_key for kid, key in breakglass_keys.items() if now < key.not_after}
    keys.update(command_keys)
    return keys


def grant_id_of(code_id: str) -> str:
    return GRANT_PREFIX + code_id


def first_lock(
    locks: Iterable[KeptLock], subject: str, action: str, now: datetime
) -> KeptLock | None:
    return next((lock for lock in locks if lock.matches(subject, action, now)), None)


def decide_use(
    code: Code,
    *,
    own_name: str,
    caller: str | None,
    caller_is_root: bool,
    now: datetime,
    already_used: bool,
    lease_taken: bool,
    locks: Iterable[KeptLock],
    cap: timedelta,
) -> Refused | tuple[Lease, Use]:
    """The lease a verified code gives now, or why not. The caller must be the code's subject
    or root; the code must name this agent and not have expired; it works once; a kept lock on
    its subject or action (or on the whole host) refuses it."""
    if code.agent != own_name:
        return Refused("this code is for another host")
    if not caller_is_root and caller != code.subject:
        return Refused(f"this code is for {code.subject}: run it as that user or as root")
    if now >= code.expires_at:
        return Refused("this code has expired")
    if now < code.issued_at - timedelta(minutes=5):
        # Issued in the future by this host's clock: a clock far behind, or a forged time.
        return Refused("this code is not valid yet (is the host's clock right?)")
    if already_used or lease_taken:
        return Refused("this code was used already (each code works once)")
    lock = first_lock(locks, code.subject, code.action, now)
    if lock is not None:
        return Refused(f"locked by the coordinator ({lock.lock_id}): {lock.reason}")
    if code.duration <= timedelta(0):
        return Refused("this code grants no time")
    not_after = now + min(code.duration, cap)
    grant_id = grant_id_of(code.code_id)
    lease = Lease(
        grant_id=grant_id,
        subject=code.subject,
        action=code.action,
        not_before=now,
        not_after=not_after,
        state=LeaseState.ACTIVE,
        seq=0,
        offline=HOLD,
        # Applied at once, in the transaction that records the use (fail closed: a failed
        # apply ends it).
        applied_at=now,
    )
    use = Use(
        code_id=code.code_id,
        grant_id=grant_id,
        code=code.raw,
        subject=code.subject,
        action=code.action,
        caller=caller or "root",
        used_at=now,
        not_after=not_after,
    )
    return lease, use


@dataclass(frozen=True, slots=True)
class LockChange:
    """What a lock command (or a snapshot's locks) does to the kept locks, in the command's own
    transaction: `replace` drops every kept lock first (a snapshot's complete list)."""

    put: tuple[KeptLock, ...] = ()
    drop: tuple[str, ...] = ()
    replace: bool = False
