"""Agents: enrollment, join tokens, removal, and what happens on an agent's stream (hello, acks,
observed events). The stream itself lives in rpc/; the decisions live here."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, replace
from datetime import datetime, timedelta

from jitmesh import validation as v
from jitmesh.clock import Clock
from jitmesh.crashpoints import crash_point
from jitmesh.types import Agent, Grant, GrantState, JoinTokenInfo, LockTarget

from .access import hash_secret
from .batching import GroupCommit
from .errors import (
    Conflict,
    DomainError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    invalid_input,
)
from .grants import end_grants
from .hub import Hub
from .lifecycle import DUE_GRANT_STATES, LIVE_GRANT_STATES
from .models import (
    NO_CHANGE,
    AgentAck,
    AgentHello,
    AgentObservation,
    AuditEntry,
    Command,
    CommandKind,
    GrantChange,
    Principal,
    Resume,
    new_secret,
)
from .ports import CommandSink, Store, Tx

DEFAULT_JOIN_TTL = timedelta(hours=1)
# A replica that has not reported itself running for this long is taken as gone.
REPLICA_ALIVE = timedelta(seconds=30)
MAX_JOIN_TTL = timedelta(days=7)
BACKLOG_PAGE = 500
EVENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class FleetService:
    def __init__(
        self,
        store: Store,
        links: CommandSink,
        hub: Hub,
        clock: Clock,
        epoch: int,
        replica: str = "",
    ):
        self._store = store
        # This coordinator replica: recorded as the holder of each agent stream it serves.
        self.replica = replica
        self._links = links
        self._hub = hub
        self._clock = clock
        self.epoch = epoch
        self._acks = GroupCommit(self._ack_batch, ACK_BATCH)
        self._hellos = GroupCommit(self._hello_batch, ACK_BATCH)

    # Operators.

    async def list_agents(self, principal: Principal) -> list[Agent]:
        live = await self._live_replicas()
        return [self._live(a, live) for a in await self._store.list_agents()]

    async def get_agent(self, principal: Principal, name: str) -> Agent:
        agent = await self._store.get_agent(name) if v.AGENT.fullmatch(name) else None
        if agent is None:
            raise NotFound("no such agent")
        return self._live(agent, await self._live_replicas())

    async def create_join_token(
        self,
        principal: Principal,
        labels: dict[str, str],
        ttl: timedelta | None,
        *,
        max_uses: int | None = 1,
        token: str | None = None,
        replaces: str = "",
    ) -> tuple[str, datetime | None]:
        """`create_join_token_info`, answering the token and its expiry only."""
        secret, info = await self.create_join_token_info(
            principal, labels, ttl, max_uses=max_uses, token=token, replaces=replaces
        )
        return secret, info.expires_at

    async def create_join_token_info(
        self,
        principal: Principal,
        labels: dict[str, str],
        ttl: timedelta | None,
        *,
        max_uses: int | None = 1,
        token: str | None = None,
        replaces: str = "",
    ) -> tuple[str, JoinTokenInfo]:
        """A one-time join token (reusable with max_uses=None, for development mode only).

        The enrolled agent gets exactly `labels`. With `replaces`, the token may enroll that
        already enrolled agent again (a reinstalled host), keeping its labels unless others are
        given; no other token can take a name in use."""
        _require_admin(principal)
        with invalid_input():
            labels = v.check_labels(labels)
            if replaces:
                v.check(v.AGENT, replaces, "replaces")
        if ttl is not None and not timedelta(seconds=1) <= ttl <= MAX_JOIN_TTL:
            raise InvalidArgument("join token ttl must be between 1s and 7d")
        if replaces:
            existing = await self._store.get_agent(replaces)
            if existing is None:
                raise NotFound("no such agent to replace")
            labels = labels or dict(existing.labels)
        now = self._clock.now()
        expires_at = None if ttl is None and max_uses is None else now + (ttl or DEFAULT_JOIN_TTL)
        secret = token or new_secret("jmj")
        details = {
            "labels": _labels(labels),
            "uses": "unlimited" if max_uses is None else str(max_uses),
        }
        if replaces:
            details["replaces"] = replaces
        async with self._store.transaction() as tx:
            await tx.insert_join_token(
                hash_secret(secret),
                labels,
                principal.name,
                now,
                expires_at,
                max_uses,
                replaces or None,
            )
            await tx.audit(
                AuditEntry("agent.join_token_created", principal.name, now, details=details)
            )
        await self._hub.audit_written(tx.new_audit)
        info = JoinTokenInfo(
            join_token_id(secret), labels, replaces, principal.name, now, expires_at, max_uses
        )
        return secret, info

    async def list_join_tokens(
        self, principal: Principal, *, include_ended: bool
    ) -> list[JoinTokenInfo]:
        """Join tokens (never the tokens themselves), oldest first; only those that can still
        enroll an agent unless `include_ended`."""
        _require_admin(principal)
        tokens = await self._store.list_join_tokens()
        now = self._clock.now()
        return [t for t in tokens if include_ended or t.live(now)]

    async def revoke_join_token(
        self, principal: Principal, token_id: str, reason: str, *, actor: str = ""
    ) -> JoinTokenInfo:
        """From now on the join token enrolls nothing (agents enrolled with it stay); audited.
        `actor` names a local operation (`retire-dev`) instead of the principal."""
        _require_admin(principal)
        with invalid_input():
            v.check_reason(reason)
        if not JOIN_TOKEN_ID.fullmatch(token_id):
            raise InvalidArgument(
                "a join token id is 16 hexadecimal digits (jitctl agent token list)"
            )
        now = self._clock.now()
        by = actor or principal.name
        async with self._store.transaction() as tx:
            if not await tx.revoke_join_token(token_id, now, by):
                raise NotFound("no such join token, or it is revoked already")
            await tx.audit(
                AuditEntry(
                    "agent.join_token_revoked",
                    by,
                    now,
                    details={"id": token_id, "reason": reason[:256]},
                )
            )
        await self._hub.audit_written(tx.new_audit)
        for info in await self._store.list_join_tokens():
            if info.id == token_id:
                return info
        raise NotFound("no such join token")

    async def remove_agent(self, principal: Principal, name: str) -> None:
        _require_admin(principal)
        now = self._clock.now()
        async with self._store.transaction() as tx:
            if not v.AGENT.fullmatch(name):
                raise NotFound("no such agent")
            live = await tx.locked_grants(LockTarget(agent=name), LIVE_GRANT_STATES)
            if not await tx.remove_agent(name, now):
                raise NotFound("no such agent")
            await tx.audit(AuditEntry("agent.removed", principal.name, now, agent=name))
            # The agent can no longer connect, so no revoke can be acknowledged: its live grants
            # are REVOKE_FAILED (never reported as revoked); the host still ends them at not_after.
            await end_grants(
                tx,
                live,
                now,
                by=principal.name,
                end_reason="agent removed",
                kind="grant.revoke_failed",
                failure="agent removed before a revoke could be acknowledged",
                expected=LIVE_GRANT_STATES - {GrantState.REVOKE_FAILED},
            )
        self._links.disconnect(name, "agent removed")
        await self._hub.audit_written(tx.new_audit)

    # Agents.

    async def enroll(
        self,
        join_token: str,
        name: str,
        labels: dict[str, str],
        issue: Callable[[str], str] | None = None,
        *,
        peer: str = "",
    ) -> tuple[str, str]:
        """Trade a join token for an agent credential. Returns (agent name, credential).

        The token is checked and spent first; only then does `issue(name)` make the credential
        (with mTLS: sign the agent's CSR, returning the binding to that certificate). The agent
        gets the token's labels: asking for any other label, or for a name already enrolled
        (unless the token was made to replace it), is refused. A refusal spends nothing and is
        audited; a replacement cuts the old agent's stream, whose certificate no longer binds."""
        with invalid_input():
            v.check(v.AGENT, name, "agent name")
            labels = v.check_labels(labels)
        now = self._clock.now()
        try:
            async with self._store.transaction() as tx:
                token = await tx.use_join_token(hash_secret(join_token), now)
                if token is None:
                    raise Unauthenticated("join token is not valid, used up or expired")
                if token.reusable:
                    # The development-mode token (loopback demo): the agent picks its labels.
                    given = {**labels, **token.labels}
                elif any(token.labels.get(k) != val for k, val in labels.items()):
                    raise PermissionDenied("the agent asks for labels its join token does not give")
                else:
                    given = dict(token.labels)
                if token.replaces is not None and token.replaces != name:
                    raise PermissionDenied("this join token only enrolls the agent it replaces")
                replaced = await tx.get_agent(name) is not None
                if replaced and token.reusable and self._links.connected(name):
                    # Dev mode lets an agent that lost its credential enroll its name again,
                    # not a second process take the name from a connected one (the two would
                    # take it from each other for ever).
                    raise Conflict(
                        f"agent {name} is connected now: another agent process already uses "
                        "this name (stop it, or give this one another --name)"
                    )
                if replaced and token.replaces != name and not token.reusable:
                    raise Conflict(
                        "an agent with this name is enrolled: remove it, or create a join token "
                        "that replaces it"
                    )
                credential = issue(name) if issue is not None else new_secret("jma")
                created = await tx.enroll_agent(
                    name, given, hash_secret(credential), now, join_token_id(join_token)
                )
                kind = (
                    "agent.enrolled"
                    if created
                    else "agent.replaced"
                    if replaced
                    else "agent.reenrolled"
                )
                await tx.audit(
                    AuditEntry(
                        kind,
                        f"agent:{name}",
                        now,
                        agent=name,
                        details={"labels": _labels(given)},
                    )
                )
        except DomainError as exc:
            await self.enrollment_refused(name, exc.message, peer)
            raise
        if replaced:
            # Its certificate (or credential) no longer binds: end the stream it may still hold.
            self._links.disconnect(name, "agent replaced by a new enrollment")
        await self._hub.audit_written(tx.new_audit)
        return name, credential

    async def enrollment_refused(self, name: str, reason: str, peer: str = "") -> None:
        """Audit a refused enrollment (the name is the one asked for, already validated or
        cut short; never the token)."""
        details = {"reason": reason[:128]}
        if peer:
            details["peer"] = peer[:64]
        agent = name if v.AGENT.fullmatch(name) else ""
        async with self._store.transaction() as tx:
            await tx.audit(
                AuditEntry(
                    "agent.enroll_refused",
                    "anonymous",
                    self._clock.now(),
                    agent=agent,
                    details=details,
                )
            )
        await self._hub.audit_written(tx.new_audit)

    async def renew_credential(self, principal: Principal, old: str, new: str) -> None:
        """Bind the agent to a new credential (its renewed certificate); the old one stops
        working. Refused when the old one is no longer the agent's (removed, re-enrolled)."""
        now = self._clock.now()
        async with self._store.transaction() as tx:
            # Read inside the transaction: no removal can commit between this check and the
            # update (SQLite holds the write lock; PostgreSQL locks the row it updates).
            if await tx.agent_for_credential(hash_secret(old)) != principal.name:
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
            await self._refuse_impersonation(principal, "hello", hello.name)
            raise PermissionDenied("hello names another agent than the credential")
        agent = await self._store.get_agent(principal.name)
        if agent is None:
            raise Unauthenticated("agent is not enrolled")
        # Group-committed: after a coordinator restart thousands of agents say Hello at once.
        await self._hellos.submit((agent.name, hello, now))
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

    async def _hello_batch(self, batch: Sequence[tuple[str, AgentHello, datetime]]) -> list[None]:
        async with self._store.transaction() as tx:
            for name, hello, now in batch:
                await tx.agent_seen(
                    name,
                    now,
                    version=hello.version[:64],
                    boot_id=hello.boot_id[:64],
                    replica=self.replica,
                )
            await tx.audit_many(
                [
                    AuditEntry(
                        "agent.connected",
                        f"agent:{name}",
                        now,
                        agent=name,
                        details={
                            "last_applied_seq": str(hello.last_applied_seq),
                            "version": hello.version[:64],
                        },
                    )
                    for name, hello, now in batch
                ]
            )
        await self._hub.audit_written(tx.new_audit)
        return [None] * len(batch)

    async def backlog(self, agent: str, after_seq: int) -> list[Command]:
        return await self._store.commands_after(agent, after_seq, BACKLOG_PAGE)

    async def ack(self, principal: Principal, ack: AgentAck) -> None:
        """Record an agent's ack of a command and move its grant on; returns once durable.
        Acks from all streams are group-committed (`batching.GroupCommit`): a fleet-wide
        revoke's thousands of acks cost a few commits, not one per agent."""
        # The command reached the agent and was applied, the ack is not recorded yet.
        crash_point("after_push")
        await self._acks.submit(_PendingAck(principal.name, ack))

    @property
    def acks_waiting(self) -> int:
        """Acks received and not yet durable (for tests and metrics)."""
        return self._acks.waiting

    async def _ack_batch(self, batch: Sequence[_PendingAck]) -> list[None]:
        now = self._clock.now()
        request_ids: list[str] = []
        # The same command acked twice in one batch (an old and a new stream of one agent):
        # each repeat goes in a later round, so the store sees the acks in their order, exactly
        # as one by one (a repeat is ignored, or a revoke's APPLIED supersedes its FAILED).
        rounds: list[list[_PendingAck]] = []
        round_of: list[int] = []
        seen: dict[tuple[str, int], int] = {}
        for pending in batch:
            key = (pending.agent, pending.ack.seq)
            k = seen[key] = seen.get(key, -1) + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(pending)
            round_of.append(k)
        async with self._store.transaction() as tx:
            recorded = [
                await tx.ack_commands(
                    [(p.agent, p.ack.seq, p.ack.status, p.ack.reason[:256]) for p in acks], now
                )
                for acks in rounds
            ]
            grant_ids = {grant_id for found in recorded for _, grant_id, _ in found.values()}
            grants = await tx.get_grants(sorted(grant_ids))
            moves = _Moves(grants)
            entries: list[AuditEntry] = []
            for pending, k in zip(batch, round_of, strict=True):
                found = recorded[k].get((pending.agent, pending.ack.seq))
                grant = None if found is None else grants.get(found[1])
                if found is None or grant is None:
                    continue  # an unknown or repeated ack moves nothing
                kind, _, issued_at = found
                entries.append(moves.ack(pending.agent, grant, kind, pending.ack, now, issued_at))
                request_ids.append(grant.request_id)
            for ids, expected, state, change in moves.grouped():
                await tx.move_grants(ids, expected=[expected], state=state, change=change)
            await tx.audit_many(entries)
        crash_point("after_ack")
        if request_ids:
            self._hub.requests_changed(request_ids)
        await self._hub.audit_written(tx.new_audit)
        return [None] * len(batch)

    async def observed(self, principal: Principal, event: AgentObservation) -> None:
        """Store an event the agent observed on its host, once per agent and event id."""
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
                    # Stored once per agent and event id: agent names hold no ':', so one
                    # agent's ids can never collide with (and swallow) another's.
                    id=f"{principal.name}:{event.event_id}",
                )
            )
            if stored and event.counter:
                await self._check_counter(tx, principal.name, event.counter, now)
            if stored and grant is not None and event.kind == "grant.expired":
                await tx.move_grant(
                    grant.id,
                    expected=DUE_GRANT_STATES,
                    state=GrantState.EXPIRED,
                    change=GrantChange(ended_at=now, end_reason="expired"),
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
                    change=GrantChange(ended_at=now),
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
            await tx.agent_left(principal.name, self.replica, now)
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

    async def _live_replicas(self) -> set[str]:
        """Replicas that reported themselves running lately (a killed one stops doing so)."""
        now = self._clock.now()
        return {
            r.id for r in await self._store.list_replicas() if now - r.last_seen_at <= REPLICA_ALIVE
        }

    def _live(self, agent: Agent, live: set[str]) -> Agent:
        """Connected: its stream is here, or on another replica that is still running."""
        if self._links.connected(agent.name):
            return replace(agent, connected=True, replica=self.replica)
        held = agent.replica if agent.replica in live and agent.replica != self.replica else ""
        return replace(agent, connected=bool(held), replica=held)


JOIN_TOKEN_ID = re.compile(r"[0-9a-f]{16}")


def join_token_id(secret: str) -> str:
    """How a join token is named once made: a prefix of its hash (like operator tokens)."""
    return hash_secret(secret)[:16]


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={val}" for k, val in sorted(labels.items()))


def _require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise PermissionDenied("this needs the admins group")


# Acks written per transaction at most (a fleet-wide revoke's acks go in a few commits).
ACK_BATCH = 2000


@dataclass(frozen=True, slots=True)
class _PendingAck:
    agent: str
    ack: AgentAck


class _Moves:
    """The grant moves of a batch of acks, worked out in order in memory (the batch is one
    transaction under the store's writer lock, so what was read is what is there), then written
    as one compare-and-set per (from, to, columns) group. The outcome is the same as moving
    grant by grant, ack by ack."""

    def __init__(self, grants: dict[str, Grant]) -> None:
        self._start = {gid: g.state for gid, g in grants.items()}
        self._state = dict(self._start)
        self._changes: dict[str, GrantChange] = {}

    def _move(
        self,
        grant_id: str,
        expected: tuple[GrantState, ...],
        state: GrantState,
        change: GrantChange,
    ) -> None:
        if self._state[grant_id] in expected:
            self._state[grant_id] = state
            before = self._changes.get(grant_id, NO_CHANGE)
            # Later moves of the same grant in the batch win field by field, as one by one.
            self._changes[grant_id] = GrantChange(
                *(
                    new if new is not None else old
                    for old, new in zip(astuple(before), astuple(change), strict=True)
                )
            )

    def ack(
        self,
        agent: str,
        grant: Grant,
        kind: CommandKind,
        ack: AgentAck,
        now: datetime,
        issued_at: datetime,
    ) -> AuditEntry:
        """Move the grant as this ack says; the audit entry it gets (written either way)."""
        # From the command's commit to the agent's ack: the propagation a revoke receipt shows.
        latency_ms = str(int((now - issued_at).total_seconds() * 1000))
        details = {"action": grant.action, "seq": str(ack.seq)}
        reason = ack.reason[:256]
        if kind is CommandKind.EXTEND:
            # The grant stays as it is: only its end moved (and was audited grant.extended
            # when decided). The ack says whether the host has the new end.
            applied = ack.status == "APPLIED"
            what = "grant.extension_applied" if applied else "grant.extension_failed"
            details["not_after"] = grant.not_after.isoformat()
            if applied:
                details["latency_ms"] = latency_ms
            else:
                details.update(status=ack.status, reason=reason)
        elif kind is CommandKind.GRANT and ack.status == "APPLIED":
            self._move(
                grant.id,
                (GrantState.PENDING_DELIVERY,),
                GrantState.ACTIVE,
                GrantChange(applied_at=now),
            )
            what = "grant.applied"
            details["latency_ms"] = latency_ms
        elif kind is CommandKind.GRANT:
            ended = GrantState.EXPIRED if now >= grant.not_after else GrantState.FAILED
            self._move(
                grant.id,
                (GrantState.PENDING_DELIVERY,),
                ended,
                GrantChange(failure=reason, ended_at=now),
            )
            what = "grant.apply_failed"
            details.update(status=ack.status, reason=reason)
        elif ack.status == "APPLIED":
            state = GrantState.RELEASED if grant.end_reason == "released" else GrantState.REVOKED
            self._move(
                grant.id,
                (GrantState.REVOKING, GrantState.REVOKE_FAILED),
                state,
                GrantChange(ended_at=now),
            )
            what = f"grant.{state.value.lower()}"
            details["latency_ms"] = latency_ms
        else:
            self._move(
                grant.id,
                (GrantState.REVOKING,),
                GrantState.REVOKE_FAILED,
                GrantChange(failure=reason),
            )
            what = "grant.revoke_failed"
            details.update(status=ack.status, reason=reason)
        return AuditEntry(
            what,
            f"agent:{agent}",
            now,
            subject=grant.subject,
            agent=agent,
            request_id=grant.request_id,
            grant_id=grant.id,
            details=details,
        )

    def grouped(self) -> list[tuple[list[str], GrantState, GrantState, GrantChange]]:
        groups: dict[tuple[GrantState, GrantState, GrantChange], list[str]] = {}
        for grant_id, state in self._state.items():
            start = self._start[grant_id]
            if state is start:
                continue
            groups.setdefault((start, state, self._changes[grant_id]), []).append(grant_id)
        return [(ids, start, state, change) for (start, state, change), ids in groups.items()]
