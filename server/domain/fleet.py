"""Agents: enrollment, join tokens, removal, and what happens on an agent's stream (hello, acks,
observed events). The stream itself lives in rpc/; the decisions live here."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from jitmesh import validation as v
from jitmesh.clock import Clock
from jitmesh.crashpoints import crash_point
from jitmesh.types import Agent, Grant, GrantState

from .access import hash_secret
from .batching import GroupCommit
from .errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from .hub import Hub
from .models import (
    AgentAck,
    AgentHello,
    AgentObservation,
    AuditEntry,
    Command,
    CommandKind,
    Principal,
    Resume,
    new_secret,
)
from .ports import CommandSink, Store, Tx

DEFAULT_JOIN_TTL = timedelta(hours=1)
MAX_JOIN_TTL = timedelta(days=7)
BACKLOG_PAGE = 500
EVENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class FleetService:
    def __init__(self, store: Store, links: CommandSink, hub: Hub, clock: Clock, epoch: int):
        self._store = store
        self._links = links
        self._hub = hub
        self._clock = clock
        self.epoch = epoch
        self._acks = GroupCommit(self._ack_many)

    # Operators.

    async def list_agents(self, principal: Principal) -> list[Agent]:
        return [self._live(a) for a in await self._store.list_agents()]

    async def get_agent(self, principal: Principal, name: str) -> Agent:
        agent = await self._store.get_agent(name) if v.AGENT.fullmatch(name) else None
        if agent is None:
            raise NotFound("no such agent")
        return self._live(agent)

    async def create_join_token(
        self,
        principal: Principal,
        labels: dict[str, str],
        ttl: timedelta | None,
        *,
        max_uses: int | None = 1,
        token: str | None = None,
    ) -> tuple[str, datetime | None]:
        """A one-time join token (reusable with max_uses=None, for development mode only)."""
        _require_admin(principal)
        try:
            labels = v.check_labels(labels)
        except v.ValidationError as exc:
            raise InvalidArgument(str(exc)) from None
        if ttl is not None and not timedelta(seconds=1) <= ttl <= MAX_JOIN_TTL:
            raise InvalidArgument("join token ttl must be between 1s and 7d")
        now = self._clock.now()
        expires_at = None if ttl is None and max_uses is None else now + (ttl or DEFAULT_JOIN_TTL)
        secret = token or new_secret("jmj")
        async with self._store.transaction() as tx:
            await tx.insert_join_token(
                hash_secret(secret), labels, principal.name, now, expires_at, max_uses
            )
            await tx.audit(
                AuditEntry(
                    "agent.join_token_created",
                    principal.name,
                    now,
                    details={
                        "labels": ",".join(f"{k}={val}" for k, val in sorted(labels.items())),
                        "uses": "unlimited" if max_uses is None else str(max_uses),
                    },
                )
            )
        await self._hub.audit_written(tx.new_audit)
        return secret, expires_at

    async def remove_agent(self, principal: Principal, name: str) -> None:
        _require_admin(principal)
        now = self._clock.now()
        async with self._store.transaction() as tx:
            if not v.AGENT.fullmatch(name) or not await tx.remove_agent(name, now):
                raise NotFound("no such agent")
            # The agent can no longer connect, so no revoke can be acknowledged: its live grants
            # are REVOKE_FAILED (never reported as revoked); the host still ends them at not_after.
            for grant in await self._store.live_grants(name):
                await tx.move_grant(
                    grant.id,
                    expected=[grant.state],
                    state=GrantState.REVOKE_FAILED,
                    failure="agent removed before a revoke could be acknowledged",
                    ended_by=principal.name,
                    ended_at=now,
                )
            await tx.audit(AuditEntry("agent.removed", principal.name, now, agent=name))
        self._links.disconnect(name, "agent removed")
        await self._hub.audit_written(tx.new_audit)

    # Agents.

    async def enroll(
        self, join_token: str, name: str, labels: dict[str, str], credential: str | None = None
    ) -> tuple[str, str]:
        """Trade a join token for an agent credential. Returns (agent name, credential).

        With mTLS the caller passes the credential: a binding to the certificate it issued."""
        try:
            v.check(v.AGENT, name, "agent name")
            labels = v.check_labels(labels)
        except v.ValidationError as exc:
            raise InvalidArgument(str(exc)) from None
        now = self._clock.now()
        credential = credential or new_secret("jma")
        async with self._store.transaction() as tx:
            token_labels = await tx.use_join_token(hash_secret(join_token), now)
            if token_labels is None:
                raise Unauthenticated("join token is not valid, used up or expired")
            # Labels bound to the join token win over what the agent asks for.
            merged = {**labels, **token_labels}
            created = await tx.enroll_agent(name, merged, hash_secret(credential), now)
            await tx.audit(
                AuditEntry(
                    "agent.enrolled" if created else "agent.reenrolled",
                    f"agent:{name}",
                    now,
                    agent=name,
                    details={"labels": ",".join(f"{k}={val}" for k, val in sorted(merged.items()))},
                )
            )
        await self._hub.audit_written(tx.new_audit)
        return name, credential

    async def renew_credential(self, principal: Principal, old: str, new: str) -> None:
        """Bind the agent to a new credential (its renewed certificate); the old one stops
        working. Refused when the old one is no longer the agent's (removed, re-enrolled)."""
        now = self._clock.now()
        async with self._store.transaction() as tx:
            # The write lock is held: no removal can commit between this check and the update.
            if await self._store.agent_for_credential(hash_secret(old)) != principal.name:
                raise Unauthenticated("agent credential is not valid")
            agent = await tx.get_agent(principal.name)
            if agent is None:
                raise Unauthenticated("agent is not enrolled")
            await tx.enroll_agent(agent.name, agent.labels, hash_secret(new), now)
            await tx.audit(
                AuditEntry(
                    "agent.certificate_renewed", f"agent:{agent.name}", now, agent=agent.name
                )
            )
        await self._hub.audit_written(tx.new_audit)

    async def authenticate_agent(self, credential: str) -> Principal:
        name = await self._store.agent_for_credential(hash_secret(credential))
        if name is None:
            raise Unauthenticated("agent credential is not valid")
        return Principal(name=name, kind="agent")

    async def hello(self, principal: Principal, hello: AgentHello) -> Resume:
        """Check the Hello against the credential and say where the agent's log resumes."""
        now = self._clock.now()
        if hello.name != principal.name:
            async with self._store.transaction() as tx:
                await tx.audit(
                    AuditEntry(
                        "agent.impersonation_refused",
                        f"agent:{principal.name}",
                        now,
                        agent=principal.name,
                        details={"claimed": hello.name[:64]},
                    )
                )
            await self._hub.audit_written(tx.new_audit)
            raise PermissionDenied("hello names another agent than the credential")
        agent = await self._store.get_agent(principal.name)
        if agent is None:
            raise Unauthenticated("agent is not enrolled")
        async with self._store.transaction() as tx:
            await tx.agent_seen(
                agent.name, now, version=hello.version[:64], boot_id=hello.boot_id[:64]
            )
            await tx.audit(
                AuditEntry(
                    "agent.connected",
                    f"agent:{agent.name}",
                    now,
                    agent=agent.name,
                    details={
                        "last_applied_seq": str(hello.last_applied_seq),
                        "version": hello.version[:64],
                    },
                )
            )
        await self._hub.audit_written(tx.new_audit)
        if hello.last_applied_seq > agent.last_seq or (
            hello.last_applied_seq == 0 and agent.last_seq > 0
        ):
            # The agent has seen commands this log does not hold (a restored or replaced store),
            # or it lost its lease table (moved aside as corrupt, a reinstalled host): only a full
            # snapshot brings it back in line. Replaying the whole log instead would apply, for a
            # moment, grants that were revoked later in it.
            grants = await self._store.live_grants(agent.name)
            return Resume(agent.last_seq, (), tuple(grants), agent.last_seq)
        resume_after = hello.last_applied_seq
        unacked = await self._store.first_unacked_seq(agent.name)
        if unacked is not None:
            # Resend what was applied but never acknowledged here (the ack was lost in a crash);
            # the agent re-acks duplicates without applying them twice.
            resume_after = min(resume_after, unacked - 1)
        return Resume(resume_after, (), None, 0)

    async def backlog(self, agent: str, after_seq: int) -> list[Command]:
        return await self._store.commands_after(agent, after_seq, BACKLOG_PAGE)

    async def ack(self, principal: Principal, ack: AgentAck) -> None:
        # The command reached the agent and was applied, the ack is not recorded yet.
        crash_point("after_push")
        await self._acks.submit((principal.name, ack))

    async def _ack_many(self, acks: Sequence[tuple[str, AgentAck]]) -> list[None]:
        """Group commit of acks (from many agents at once): the commands acked, the grants moved
        and the audit events written by a few statements for the whole batch. The common case,
        a grant applied, is set-based; the others go one by one in the same transaction."""
        now = self._clock.now()
        async with self._store.transaction() as tx:
            done = await tx.ack_commands(
                [(agent, ack.seq, ack.status, ack.reason[:256]) for agent, ack in acks], now
            )
            grants = await tx.get_grants([d[1] for d in done if d is not None])
            applied: list[tuple[str, Grant, AgentAck, timedelta]] = []
            changed: list[str] = []
            for (agent, ack), found in zip(acks, done, strict=True):
                grant = None if found is None else grants.get(found[1])
                if found is None or grant is None:
                    continue
                kind, _, issued_at = found
                changed.append(grant.request_id)
                if kind is CommandKind.GRANT and ack.status == "APPLIED":
                    applied.append((agent, grant, ack, now - issued_at))
                else:
                    await self._apply_ack(tx, agent, grant, kind, ack, now, now - issued_at)
            if applied:
                await tx.move_grants(
                    [grant.id for _, grant, _, _ in applied],
                    expected=[GrantState.PENDING_DELIVERY],
                    state=GrantState.ACTIVE,
                    applied_at=now,
                )
                await tx.audit_many(
                    [
                        self._ack_entry(agent, grant, ack, now, "grant.applied", latency)
                        for agent, grant, ack, latency in applied
                    ]
                )
        crash_point("after_ack")
        self._hub.requests_changed(changed)
        await self._hub.audit_written(tx.new_audit)
        return [None] * len(acks)

    @staticmethod
    def _ack_entry(
        agent: str, grant: Grant, ack: AgentAck, now: datetime, kind: str, latency: timedelta
    ) -> AuditEntry:
        # From the command's commit to the agent's ack: the propagation a revoke receipt shows.
        return AuditEntry(
            kind,
            f"agent:{agent}",
            now,
            subject=grant.subject,
            agent=agent,
            request_id=grant.request_id,
            grant_id=grant.id,
            details={
                "action": grant.action,
                "seq": str(ack.seq),
                "latency_ms": str(int(latency.total_seconds() * 1000)),
            },
        )

    async def _apply_ack(
        self,
        tx: Tx,
        agent: str,
        grant: Grant,
        kind: CommandKind,
        ack: AgentAck,
        now: datetime,
        latency: timedelta,
    ) -> None:
        # From the command's commit to the agent's ack: the propagation a revoke receipt shows.
        latency_ms = str(int(latency.total_seconds() * 1000))
        entry = AuditEntry(
            "",
            f"agent:{agent}",
            now,
            subject=grant.subject,
            agent=agent,
            request_id=grant.request_id,
            grant_id=grant.id,
            details={"action": grant.action, "seq": str(ack.seq)},
        )
        reason = ack.reason[:256]
        if kind is CommandKind.GRANT:
            if ack.status == "APPLIED":
                await tx.move_grant(
                    grant.id,
                    expected=[GrantState.PENDING_DELIVERY],
                    state=GrantState.ACTIVE,
                    applied_at=now,
                )
                entry = replace(entry, kind="grant.applied")
                entry.details["latency_ms"] = latency_ms
            else:
                ended = now >= grant.not_after
                await tx.move_grant(
                    grant.id,
                    expected=[GrantState.PENDING_DELIVERY],
                    state=GrantState.EXPIRED if ended else GrantState.FAILED,
                    failure=reason,
                    ended_at=now,
                )
                entry = replace(entry, kind="grant.apply_failed")
                entry.details.update(status=ack.status, reason=reason)
        elif ack.status == "APPLIED":
            state = GrantState.RELEASED if grant.end_reason == "released" else GrantState.REVOKED
            await tx.move_grant(
                grant.id,
                expected=[GrantState.REVOKING, GrantState.REVOKE_FAILED],
                state=state,
                ended_at=now,
            )
            entry = replace(entry, kind=f"grant.{state.value.lower()}")
            entry.details["latency_ms"] = latency_ms
        else:
            await tx.move_grant(
                grant.id,
                expected=[GrantState.REVOKING],
                state=GrantState.REVOKE_FAILED,
                failure=reason,
            )
            entry = replace(entry, kind="grant.revoke_failed")
            entry.details.update(status=ack.status, reason=reason)
        await tx.audit(entry)

    async def observed(self, principal: Principal, event: AgentObservation) -> None:
        """Store an event the agent observed on its host, once per event id."""
        if not EVENT_ID.fullmatch(event.event_id):
            # Deduplication is by this id: an empty or shared id would swallow later events.
            raise InvalidArgument("event id is not valid (expected 1 to 64 of A-Za-z0-9._:-)")
        now = self._clock.now()
        details = {k[:64]: val[:256] for k, val in list(event.details.items())[:16]}
        details["observed_at"] = event.observed_at.isoformat()
        if event.action:
            details["action"] = event.action[:64]
        grant = (
            await self._store.get_grant(event.grant_id) if v.ID.fullmatch(event.grant_id) else None
        )
        if grant is not None and grant.agent != principal.name:
            await self._refuse_impersonation(principal, "event", grant.agent)
            raise PermissionDenied("event names another agent's grant")
        async with self._store.transaction() as tx:
            grant = await tx.get_grant(event.grant_id) if v.ID.fullmatch(event.grant_id) else None
            if grant is not None and grant.agent != principal.name:
                raise PermissionDenied("event names another agent's grant")
            stored = await tx.audit(
                AuditEntry(
                    f"agent.{event.kind[:48]}",
                    f"agent:{principal.name}",
                    now,
                    subject=grant.subject if grant else "",
                    agent=principal.name,
                    request_id=grant.request_id if grant else "",
                    grant_id=grant.id if grant else "",
                    details=details,
                    id=event.event_id,
                )
            )
            if stored and event.counter:
                await self._check_counter(tx, principal.name, event.counter, now)
            if stored and grant is not None and event.kind == "grant.expired":
                await tx.move_grant(
                    grant.id,
                    expected=[GrantState.ACTIVE, GrantState.PENDING_DELIVERY, GrantState.REVOKING],
                    state=GrantState.EXPIRED,
                    ended_at=now,
                    end_reason="expired",
                )
            if (
                stored
                and grant is not None
                and event.kind == "grant.removed"
                and event.details.get("retried") == "true"
            ):
                # A removal that had failed (REVOKE_FAILED) finally succeeded on the host: only
                # now is the grant reported as revoked (or released).
                await tx.move_grant(
                    grant.id,
                    expected=[GrantState.REVOKE_FAILED],
                    state=(
                        GrantState.RELEASED
                        if grant.end_reason == "released"
                        else GrantState.REVOKED
                    ),
                    ended_at=now,
                )
        if grant is not None:
            self._hub.requests_changed([grant.request_id])
        await self._hub.audit_written(tx.new_audit)

    async def _check_counter(self, tx: Tx, agent: str, counter: int, now: datetime) -> None:
        """Events arrive in the agent's order: a counter that jumps means events were lost on
        the way (audited with the missing range); one that falls back means the agent started
        over with a new lease table (audited too)."""
        key = f"event_counter:{agent}"
        last = int(await self._store.get_meta(key) or "0")
        await tx.set_meta(key, str(counter))
        if counter > last + 1:
            kind, details = "agent.events_missing", {"from": str(last + 1), "to": str(counter - 1)}
        elif counter <= last:
            kind, details = "agent.event_counter_reset", {"last": str(last), "now": str(counter)}
        else:
            return
        await tx.audit(AuditEntry(kind, f"agent:{agent}", now, agent=agent, details=details))

    async def _refuse_impersonation(self, principal: Principal, via: str, claimed: str) -> None:
        now = self._clock.now()
        async with self._store.transaction() as tx:
            await tx.audit(
                AuditEntry(
                    "agent.impersonation_refused",
                    f"agent:{principal.name}",
                    now,
                    agent=principal.name,
                    details={"claimed": claimed[:64], "via": via},
                )
            )
        await self._hub.audit_written(tx.new_audit)

    async def disconnected(self, principal: Principal, reason: str) -> None:
        now = self._clock.now()
        async with self._store.transaction() as tx:
            await tx.agent_seen(principal.name, now)
            await tx.audit(
                AuditEntry(
                    "agent.disconnected",
                    f"agent:{principal.name}",
                    now,
                    agent=principal.name,
                    details={"reason": reason[:128]},
                )
            )
        await self._hub.audit_written(tx.new_audit)

    def _live(self, agent: Agent) -> Agent:
        return replace(agent, connected=self._links.connected(agent.name))


def _require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise PermissionDenied("this needs the admins group")
