"""Break-glass on the coordinator: issue single-use codes ahead of time, adopt the leases agents
granted themselves with them, and have people review each use (docs/wire.md, "Break-glass
codes"; docs/workflow.md, "Break-glass").

A code is signed with a command-signing key so that its agent verifies it alone, while cut off.
Its text is shown once; the store keeps what it allows and the SHA-256 of the text. Signing and
reading a code's bytes is the rpc edge's work (`CodeSigner`): the domain sees only its terms.

Codes outlive key rotations: each code's signing key is stored with it, and `key_ends` says,
per agent, until when each key must still verify that agent's usable codes (the Welcome
announces the retired ones among them as break-glass keys: docs/wire.md, "Break-glass codes").

Adoption (`adopt`) runs inside the transaction of a Hello (before the resume point is worked
out, so no snapshot removes the lease) or of the agent's `breakglass.used` event, whichever
comes first, and is idempotent by code id: the grant `bg-<code id>` as the agent reported it
(ACTIVE from its use, or EXPIRED when its end has passed), the code marked used, and one
`breakglass.used` audit event.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from jitmesh import validation as v
from jitmesh.clock import Clock, rfc3339
from jitmesh.durations import format_duration
from jitmesh.keyset import MAX_CODE_VALID_FOR
from jitmesh.types import BreakglassCode, Grant, GrantState, OfflinePolicy

from .errors import Conflict, InvalidArgument, NotFound, PermissionDenied, invalid_input
from .hub import Hub
from .locks import lock_refusal, refuse_if_locked
from .models import AuditEntry, AuditKind, BreakglassUse, IssuedCode, LiveCodes, Principal
from .ports import Store, Tx

GRANT_PREFIX = "bg-"
CODE_ID = re.compile(r"[0-9a-f]{32}")
# Bounds: a code's access is short, and every code expires.
MAX_ACCESS = timedelta(hours=8)
MAX_VALID_FOR = MAX_CODE_VALID_FOR
MAX_COUNT = 20


@dataclass(frozen=True, slots=True)
class CodeTerms:
    """What a code allows, as signed (BreakglassGrant)."""

    code_id: str
    agent: str
    subject: str
    action: str
    duration: timedelta
    issued_at: datetime
    expires_at: datetime
    issued_by: str
    epoch: int = 0
    # The key that signed it (as read back by `CodeSigner.verify`).
    key_id: str = ""


class CodeSigner(Protocol):
    def sign(self, terms: CodeTerms) -> tuple[str, str]:
        """The id of the key that signed it, and the code's text (base64url of the signed
        BreakglassCode)."""
        ...

    def signed_between(self, first: datetime, last: datetime) -> list[str]:
        """The ids of the keys that may have signed a code issued from `first` to `last` (those
        current then), for codes whose key was not recorded."""
        ...

    def verify(self, code: bytes) -> CodeTerms | None:
        """The terms of a serialized BreakglassCode signed by one of this coordinator's keys
        (retired ones included), or None."""
        ...

    def compromised(self, key_id: str) -> bool:
        """Whether `key_id` was retired because it leaked: nothing it signed is adopted."""
        ...


def code_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class BreakglassService:
    def __init__(
        self, store: Store, signer: CodeSigner, hub: Hub, clock: Clock, epoch: int = 0
    ) -> None:
        self._store = store
        self._signer = signer
        self._hub = hub
        self._clock = clock
        self._epoch = epoch

    async def issue(
        self,
        principal: Principal,
        *,
        agent: str,
        subject: str,
        action: str,
        duration: timedelta,
        valid_for: timedelta,
        count: int,
        reason: str,
    ) -> list[tuple[BreakglassCode, str]]:
        """New codes, each with its text (shown once, never stored)."""
        _require_admin(principal)
        with invalid_input():
            v.check(v.AGENT, agent, "agent")
            v.check(v.SUBJECT, subject, "subject")
            v.check(v.ACTION, action, "action")
            v.check_reason(reason)
        if not timedelta(seconds=1) <= duration <= MAX_ACCESS:
            raise InvalidArgument(f"duration must be between 1s and {format_duration(MAX_ACCESS)}")
        if not timedelta(seconds=1) <= valid_for <= MAX_VALID_FOR:
            raise InvalidArgument(
                f"valid_for must be between 1s and {format_duration(MAX_VALID_FOR)}"
            )
        count = count or 1
        if not 1 <= count <= MAX_COUNT:
            raise InvalidArgument(f"count must be between 1 and {MAX_COUNT}")
        if await self._store.get_agent(agent) is None:
            raise NotFound("no such agent")
        now = self._clock.now()
        lock = await self._store.lock_in_force(subject, agent, action, now)
        if lock is not None:
            # A code is access: a lock in force stops it as it stops a request (the agent
            # would refuse the code while it keeps the lock, and accept it once unlocked).
            await self._issue_refused(principal.name, agent, subject, action, lock.id, now)
            raise lock_refusal(lock)
        issued: list[tuple[BreakglassCode, str]] = []
        stored: list[IssuedCode] = []
        for _ in range(count):
            terms = CodeTerms(
                code_id=secrets.token_hex(16),
                agent=agent,
                subject=subject,
                action=action,
                duration=duration,
                issued_at=now,
                expires_at=now + valid_for,
                issued_by=principal.name,
                epoch=self._epoch,
            )
            code = BreakglassCode(
                id=terms.code_id,
                agent=agent,
                subject=subject,
                action=action,
                duration=duration,
                issued_at=now,
                issued_by=principal.name,
                expires_at=terms.expires_at,
                reason=reason,
            )
            key_id, text = self._signer.sign(terms)
            issued.append((code, text))
            stored.append(IssuedCode(code, code_hash(text), key_id))
        async with self._store.transaction() as tx:
            # Again inside the writing transaction: no lock commits between check and insert.
            await refuse_if_locked(tx, subject, agent, action, now)
            await tx.insert_breakglass_codes(stored)
            await tx.audit_many(
                [
                    AuditEntry(
                        AuditKind.BREAKGLASS_ISSUED,
                        principal.name,
                        now,
                        subject=subject,
                        agent=agent,
                        details={
                            "action": action,
                            "code_id": code.id,
                            "duration": format_duration(duration),
                            "expires_at": rfc3339(code.expires_at),
                            **({"reason": reason} if reason else {}),
                        },
                    )
                    for code, _ in issued
                ]
            )
        await self._hub.audit_written(tx.new_audit)
        return issued

    async def _issue_refused(
        self, by: str, agent: str, subject: str, action: str, lock_id: str, now: datetime
    ) -> None:
        async with self._store.transaction() as tx:
            await tx.audit(
                AuditEntry(
                    AuditKind.BREAKGLASS_ISSUE_REFUSED,
                    by,
                    now,
                    subject=subject,
                    agent=agent,
                    details={"action": action, "why": f"locked by {lock_id}"},
                )
            )
        await self._hub.audit_written(tx.new_audit)

    async def list(
        self,
        principal: Principal,
        *,
        unreviewed: bool,
        agent: str,
        subject: str,
        include_expired: bool,
    ) -> list[BreakglassCode]:
        _require_admin(principal)
        return await self._store.list_breakglass_codes(
            unreviewed=unreviewed,
            agent=agent,
            subject=subject,
            include_expired=include_expired,
            now=self._clock.now(),
        )

    async def review(self, principal: Principal, code_id: str, note: str) -> BreakglassCode:
        """Mark a used code as reviewed (once)."""
        _require_admin(principal)
        if not CODE_ID.fullmatch(code_id):
            raise InvalidArgument("a break-glass code id is 32 hexadecimal digits")
        with invalid_input():
            v.check_reason(note, field="note")
        now = self._clock.now()
        async with self._store.transaction() as tx:
            code = await tx.get_breakglass_code(code_id)
            if code is None:
                raise NotFound("no such break-glass code")
            if code.used_at is None:
                raise Conflict("this code has not been used: there is nothing to review")
            if not await tx.review_breakglass(code_id, at=now, by=principal.name, note=note):
                raise Conflict("this use was reviewed already")
            await tx.audit(
                AuditEntry(
                    AuditKind.BREAKGLASS_REVIEWED,
                    principal.name,
                    now,
                    subject=code.subject,
                    agent=code.agent,
                    grant_id=code.grant_id,
                    details={
                        "action": code.action,
                        "code_id": code.id,
                        **({"note": note} if note else {}),
                    },
                )
            )
            reviewed = await tx.get_breakglass_code(code_id)
            assert reviewed is not None
        await self._hub.audit_written(tx.new_audit)
        return reviewed


async def adopt(tx: Tx, signer: CodeSigner, agent: str, use: BreakglassUse, now: datetime) -> bool:
    """Record a use `agent` reported: its grant, the code as used, `breakglass.used`. True when
    this call adopted it; False when it was adopted before, or refused (audited
    `breakglass.refused`: a code that does not verify, was voided or signed by a compromised
    key, or names another agent or terms)."""
    terms = signer.verify(use.code)
    record = None if terms is None else await tx.get_breakglass_code(terms.code_id)
    problem = ""
    if terms is None:
        problem = "the code does not verify under this coordinator's keys"
    elif record is not None and record.voided_at is not None:
        problem = "the code was voided (its signing key was compromised)"
    elif signer.compromised(terms.key_id) and (record is None or record.used_at is None):
        # Not on record (made up by whoever stole the key): refused all the same. A use
        # adopted before the leak, reported again, is left as it was (below).
        problem = "the code is signed by a compromised key"
    elif terms.code_id != use.code_id or use.grant_id != GRANT_PREFIX + terms.code_id:
        problem = "the reported use does not match its code"
    elif terms.agent != agent:
        problem = "the code is for another agent"
    elif (terms.subject, terms.action) != (use.subject, use.action):
        problem = "the reported subject or action differs from the code's"
    elif use.used_at >= terms.expires_at:
        problem = "used after the code's expiry"
    elif use.not_after - use.used_at > terms.duration:
        problem = "the lease is longer than the code allows"
    if terms is None or problem:
        await tx.audit(
            AuditEntry(
                AuditKind.BREAKGLASS_REFUSED,
                f"agent:{agent}",
                now,
                subject=use.subject[:128],
                agent=agent,
                details={"code_id": use.code_id[:64], "why": problem},
                id=f"{agent}:breakglass-refused:{use.code_id[:64]}",
            )
        )
        return False
    grant_id = GRANT_PREFIX + terms.code_id
    if await tx.get_grant(grant_id) is not None:
        return False
    live = use.not_after > now
    grant = Grant(
        id=grant_id,
        request_id="",
        agent=agent,
        subject=terms.subject,
        action=terms.action,
        not_before=use.used_at,
        not_after=use.not_after,
        state=GrantState.ACTIVE if live else GrantState.EXPIRED,
        offline=OfflinePolicy(),
        created_at=now,
        applied_at=use.used_at,
        ended_at=None if live else use.not_after,
        ended_by="" if live else "agent",
        end_reason="" if live else "expired",
        breakglass_code_id=terms.code_id,
    )
    await tx.insert_grants([grant])
    known = await tx.mark_breakglass_used(
        terms.code_id, used_at=use.used_at, grant_id=grant_id, used_by=use.caller
    )
    details = {
        "action": terms.action,
        "code_id": terms.code_id,
        "caller": use.caller,
        "used_at": rfc3339(use.used_at),
        "not_after": rfc3339(use.not_after),
        "issued_by": terms.issued_by,
    }
    if not known:
        # Signed by this coordinator but not in its store (restored from an older backup?):
        # the grant is recorded all the same; the code cannot be listed for review.
        details["code_record"] = "missing"
    await tx.audit(
        AuditEntry(
            AuditKind.BREAKGLASS_USED,
            f"agent:{agent}",
            now,
            subject=terms.subject,
            agent=agent,
            grant_id=grant_id,
            details=details,
            id=f"{agent}:breakglass:{terms.code_id}",
        )
    )
    return True


def key_ends(
    live: Iterable[LiveCodes], signed_between: Callable[[datetime, datetime], list[str]]
) -> dict[str, dict[str, datetime]]:
    """Per agent, the keys that signed its usable codes, each with the latest expiry of those
    codes: until then the agent must keep trusting the key for codes, rotation or not. Codes
    whose key was not recorded (issued before migration 0008) count for every key current
    while they were issued."""
    ends: dict[str, dict[str, datetime]] = {}
    for codes in live:
        keys = (
            [codes.key_id]
            if codes.key_id
            else signed_between(codes.first_issued_at, codes.last_issued_at)
        )
        for key_id in keys:
            mine = ends.setdefault(codes.agent, {})
            mine[key_id] = max(mine.get(key_id, codes.last_expires_at), codes.last_expires_at)
    return ends


def _require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise PermissionDenied("only admins may issue, list or review break-glass codes")


class RotatingKeys(Protocol):
    def current(self) -> tuple[str, datetime]:
        """The current key's id and when it became current."""
        ...

    def rotate(self, now: datetime, *, compromised: bool = False) -> str: ...


@dataclass(frozen=True, slots=True)
class CompromiseRotation:
    leaked: str
    new: str
    voided: list[Voided]


async def rotate_compromised(
    store: Store, hub: Hub, keys: RotatingKeys, actor: str, now: datetime
) -> CompromiseRotation:
    """The current key leaked: void the usable codes it signed (`void_codes`), then retire it
    as compromised (trusted for nothing but old audit checkpoints). In this order: should the
    rotation fail, the codes are void all the same (failing closed), and running it again
    finishes it."""
    leaked, since = keys.current()
    voided = await void_codes(
        store, hub, actor, leaked, current_from=since, current_to=now, now=now
    )
    return CompromiseRotation(leaked, keys.rotate(now, compromised=True), voided)


@dataclass(frozen=True, slots=True)
class Voided:
    """A usable code voided because its signing key leaked."""

    code_id: str
    agent: str
    subject: str


async def void_codes(
    store: Store,
    hub: Hub,
    actor: str,
    key_id: str,
    *,
    current_from: datetime,
    current_to: datetime,
    now: datetime,
) -> list[Voided]:
    """Void every usable code `key_id` signed, as its key leaked (`rotate-signing-key
    --compromised`): never announced for again, never adopted (`adopt`). Codes whose key was not
    recorded count as its when issued from `current_from` to `current_to` (while it was current).
    One `breakglass.voided` audit entry per code (they name the key), in one transaction."""
    async with store.transaction() as tx:
        rows = await tx.void_breakglass_codes(
            key_id, issued_from=current_from, issued_to=current_to, now=now
        )
        voided = [Voided(*row) for row in rows]
        await tx.audit_many(
            [
                AuditEntry(
                    AuditKind.BREAKGLASS_VOIDED,
                    actor,
                    now,
                    subject=code.subject,
                    agent=code.agent,
                    details={
                        "code_id": code.code_id,
                        "key_id": key_id,
                        "why": "its signing key was compromised",
                    },
                )
                for code in voided
            ]
        )
    await hub.audit_written(tx.new_audit)
    return voided
