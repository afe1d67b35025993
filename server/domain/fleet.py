"""Agents: enrollment, join tokens, removal, and what happens on an agent's stream (hello, acks,
observed events). The stream itself lives in rpc/; the decisions live here."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from jitmesh import validation as v
from jitmesh.clock import Clock, rfc3339
from jitmesh.types import Agent, Grant, GrantState, JoinTokenInfo, LockTarget
from jitmesh.versions import Compatibility, agent_compatibility, older_than
from jitmesh.versions import parse as parse_version

from . import breakglass, locks
from .access import hash_secret
from .batching import Answer, GroupCommit
from .breakglass import CodeSigner
from .delivery import DeliveryRates
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
from .lifecycle import DUE_GRANT_STATES, LIVE_GRANT_STATES, REVOCABLE_GRANT_STATES
from .models import (
    AckStatus,
    AgentAck,
    AgentHello,
    AgentObservation,
    AuditEntry,
    AuditKind,
    BreakglassUse,
    Command,
    CommandKind,
    GrantChange,
    Principal,
    Resume,
    new_secret,
    observed,
)
from .ports import CommandSink, Store, Tx
from .steps import Step, StepHook, no_hook

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
        version: str,
        replica: str = "",
        *,
        rates: DeliveryRates | None = None,
        step: StepHook = no_hook,
        codes: CodeSigner | None = None,
    ):
        self._store = store
        # Told each step of an ack (the fault suite's crash points; nothing in production).
        self._step = step
        # Reads break-glass codes agents report (None: their uses are refused, audited).
        self._codes = codes
        # This coordinator replica: recorded as the holder of each agent stream it serves.
        self.replica = replica
        # Each agent's apply rate, measured from its acks (delivery.py).
        self.rates = rates if rates is not None else DeliveryRates()
        self._links = links
        self._hub = hub
        self._clock = clock
        self.epoch = epoch
        # This coordinator's version: which agent versions it serves (docs/wire.md).
        self.version = version
        parsed = parse_version(version) or (0, 0, 0)
        self._minor = parsed[0], parsed[1]
        self._acks = GroupCommit(self._ack_batch, ACK_BATCH)
        self._hellos = GroupCommit(self._hello_batch, ACK_BATCH)
        # Small batches: with mTLS each enrollment signs a certificate inside the transaction.
        # An enrollment whose caller gave up is not written: in a burst longer than the agents'
        # enrollment deadline, each one would otherwise be written once per attempt, every
        # commit replacing the credential of the attempt before (congestion collapse: 10,000
        # agents on two replicas made 21,000 replacements in 8 minutes and few connected).
        self._enrollments = GroupCommit(self._enroll_batch, ENROLL_BATCH, skip_abandoned=True)
        # The handshakes' reads, one statement for all those that arrive together (after a
        # restart or a failover thousands do; each read alone was its own pool checkout and
        # round trip to PostgreSQL, 27 % of a replica's samples while 5,000 agents moved to it).
        self._credential_reads = GroupCommit(self._read_credentials, READ_BATCH)
        self._agent_reads = GroupCommit(self._read_agents, READ_BATCH)
        self._unacked_reads = GroupCommit(self._read_unacked, READ_BATCH)

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
                AuditEntry(AuditKind.AGENT_JOIN_TOKEN_CREATED, principal.name, now, details=details)
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
                    AuditKind.AGENT_JOIN_TOKEN_REVOKED,
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
            await tx.audit(AuditEntry(AuditKind.AGENT_REMOVED, principal.name, now, agent=name))
            # The agent can no longer connect, so no revoke can be acknowledged: its live grants
            # are REVOKE_FAILED (never reported as revoked); the host still ends them at not_after.
            await end_grants(
                tx,
                live,
                now,
                by=principal.name,
                end_reason="agent removed",
                kind=AuditKind.GRANT_REVOKE_FAILED,
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
        try:
            credential, replaced = await self._enrollments.submit(
                _Enrollment(join_token, name, labels, issue)
            )
        except DomainError as exc:
            await self.enrollment_refused(name, exc.message, peer)
            raise
        if replaced:
            # Its certificate (or credential) no longer binds: end the stream it may still hold.
            self._links.disconnect(name, "agent replaced by a new enrollment")
        return name, credential

    async def _enroll_batch(self, batch: Sequence[_Enrollment]) -> list[tuple[str, bool]]:
        """Enrollments that arrived together, in one transaction: a fleet's first rollout is a
        burst of them, and each one's own commit made the Hellos queued behind them wait for
        the whole burst. A refusal fails the batch; `GroupCommit` then writes each alone, so
        the refused one spends nothing and the others go through."""
        now = self._clock.now()
        async with self._store.transaction() as tx:
            answers = [await self._enroll_one(tx, item, now) for item in batch]
        await self._hub.audit_written(tx.new_audit)
        return answers

    async def _enroll_one(self, tx: Tx, item: _Enrollment, now: datetime) -> tuple[str, bool]:
        """One enrollment inside the batch's transaction: (credential, whether it replaced an
        enrolled agent)."""
        name, labels = item.name, item.labels
        token = await tx.use_join_token(hash_secret(item.join_token), now)
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
        credential = item.issue(name) if item.issue is not None else new_secret("jma")
        created = await tx.enroll_agent(
            name, given, hash_secret(credential), now, join_token_id(item.join_token)
        )
        enrolled = await tx.get_agent(name)
        if enrolled is not None and locks.keeps_locks(enrolled):
            # The locks in force reach it as to any agent (a whole-fleet lock's handout
            # may have passed its name already, or skipped it while it was removed).
            await locks.locks_for_agent(tx, name, now)
        kind = (
            AuditKind.AGENT_ENROLLED
            if created
            else AuditKind.AGENT_REPLACED
            if replaced
            else AuditKind.AGENT_REENROLLED
        )
        await tx.audit(
            AuditEntry(kind, f"agent:{name}", now, agent=name, details={"labels": _labels(given)})
        )
        return credential, replaced

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
                    AuditKind.AGENT_ENROLL_REFUSED,
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
                    AuditKind.AGENT_CERTIFICATE_RENEWED,
                    f"agent:{agent.name}",
                    now,
                    agent=agent.name,
                )
            )
        await self._hub.audit_written(tx.new_audit)

    async def authenticate_agent(self, credential: str) -> Principal:
        name = await self._credential_reads.submit(hash_secret(credential))
        if name is None:
            raise Unauthenticated("agent credential is not valid")
        return Principal(name=name, kind="agent")

    async def hello(self, principal: Principal, hello: AgentHello) -> Resume:
        """Check the Hello against the credential and say where the agent's log resumes."""
        now = self._clock.now()
        if hello.name != principal.name:
            await self._refuse_impersonation(principal, "hello", hello.name)
            raise PermissionDenied("hello names another agent than the credential")
        agent = await self._agent_reads.submit(principal.name)
        if agent is None:
            raise Unauthenticated("agent is not enrolled")
        if agent_compatibility(hello.version, self.version) is Compatibility.REFUSED:
            await self._refuse_version(principal, hello.version)
            raise Conflict(
                f"agent version {hello.version or 'unknown'} is not served by this coordinator "
                f"({self.version}): it serves its own minor version and the one before; "
                + (
                    "upgrade the agent"
                    if older_than(hello.version, *self._minor)
                    else "upgrade the coordinator first"
                )
            )
        if hello.breakglass:
            # Before anything else: the leases exist on the host, so no snapshot may end them.
            await self._adopt_breakglass(agent.name, hello.breakglass, now)
        # Group-committed: after a coordinator restart thousands of agents say Hello at once.
        await self._hellos.submit((agent.name, hello, now, agent.version))
        if not locks.keeps_locks_at(hello.version):
            # After its version is recorded: a lock written from now on skips this agent, and
            # one written before is settled here (locks.settle_unsent), before the resume point
            # is worked out from what is unacknowledged.
            await self._settle_unsent_locks(
                agent.name, hello.version[:64], hello.last_applied_seq, now
            )
        if hello.last_applied_seq > agent.last_seq or (
            hello.last_applied_seq == 0 and agent.last_seq > 0
        ):
            # The agent has seen commands this log does not hold (a restored or replaced store),
            # or it lost its lease table (moved aside as corrupt, a reinstalled host): only a full
            # snapshot brings it back in line. Replaying the whole log instead would apply, for a
            # moment, grants that were revoked later in it.
            return await self._snapshot(agent.name, now)
        unacked = await self._unacked_reads.submit(agent.name)
        if unacked is not None and unacked <= hello.last_applied_seq:
            # Acks lost in a coordinator crash: what the Hello proves is settled now.
            await self._settle_from_hello(agent.name, hello, unacked)
            unacked = await self._store.first_unacked_seq(agent.name)
        resume_after = hello.last_applied_seq
        if unacked is not None:
            # Resend what was applied but never acknowledged here (the ack was lost in a crash);
            # the agent acks those DUPLICATE (or NOT_APPLIED) and applies nothing twice.
            resume_after = min(resume_after, unacked - 1)
        if resume_after < agent.last_seq and resume_after < await self._store.command_log_start(
            agent.name
        ):
            # The commands it would need were truncated (domain/retention.py): it acknowledged
            # them once and lost that state since (a restored lease table). A snapshot replaces
            # what it missed.
            return await self._snapshot(agent.name, now)
        return Resume(resume_after, (), None, 0)

    async def _read_credentials(self, hashes: Sequence[str]) -> list[str | None]:
        found = await self._store.agents_for_credentials(list(set(hashes)))
        return [found.get(h) for h in hashes]

    async def _read_agents(self, names: Sequence[str]) -> list[Agent | None]:
        found = await self._store.agents_named(list(set(names)))
        return [found.get(name) for name in names]

    async def _read_unacked(self, agents: Sequence[str]) -> list[int | None]:
        found = await self._store.first_unacked_seqs(list(set(agents)))
        return [found.get(agent) for agent in agents]

    async def breakglass_key_ends(self) -> dict[str, dict[str, datetime]]:
        """Per agent, the keys that signed its usable break-glass codes, each with the latest
        expiry of those codes (`breakglass.key_ends`): what its Welcome must keep announcing."""
        if self._codes is None:
            return {}
        live = await self._store.live_breakglass_codes(self._clock.now())
        return breakglass.key_ends(live, self._codes.signed_between)

    async def _settle_unsent_locks(
        self, agent: str, version: str, last_applied_seq: int, now: datetime
    ) -> None:
        if not await self._store.unacked_lock_commands(agent):
            return  # the usual case: no write transaction for it
        async with self._store.transaction() as tx:
            await locks.settle_unsent(tx, agent, version, last_applied_seq, now)
        await self._hub.audit_written(tx.new_audit)

    async def _adopt_breakglass(
        self, agent: str, uses: Sequence[BreakglassUse], now: datetime
    ) -> None:
        """Adopt the break-glass leases an agent reports as grants (docs/wire.md)."""
        async with self._store.transaction() as tx:
            for use in uses:
                await self._adopt_one(tx, agent, use, now)
        await self._hub.audit_written(tx.new_audit)

    async def _adopt_one(self, tx: Tx, agent: str, use: BreakglassUse, now: datetime) -> None:
        signer = self._codes
        if signer is None:
            await tx.audit(
                AuditEntry(
                    AuditKind.BREAKGLASS_REFUSED,
                    f"agent:{agent}",
                    now,
                    subject=use.subject,
                    agent=agent,
                    details={"code_id": use.code_id, "why": "break-glass is not set up here"},
                    id=f"{agent}:breakglass-refused:{use.code_id}",
                )
            )
            return
        await breakglass.adopt(tx, signer, agent, use, now)

    async def _snapshot(self, agent: str, now: datetime) -> Resume:
        """A snapshot under its own, new sequence number: the agent's live grants, and as
        tombstones its grants with a revoke not yet acknowledged as done."""
        async with self._store.transaction() as tx:
            seq = await tx.append_command(agent, CommandKind.SNAPSHOT, "", now)
            # Read under the write transaction: nothing commits between the seq and the read.
            grants = await self._store.live_grants(agent)
            tombstones = [g.id for g in await self._store.unremoved_grants(agent)]
            kept = [
                lock
                for lock in await tx.locks_in_force(now)
                if not lock.target.agent or lock.target.agent == agent
            ]
        return Resume(seq, (), tuple(grants), seq, tuple(tombstones), tuple(kept))

    async def _settle_from_hello(self, agent: str, hello: AgentHello, unacked: int) -> None:
        """Acks for the unacknowledged commands at or below the Hello's last applied seq, where
        the Hello proves the outcome: a grant it lists as active was applied; a revoke whose
        grant it lists neither as active nor as removing was done (or failed, when removing).
        Revokes are settled only for agents that report removals (wire 0.2 and later)."""
        active = set(hello.active_grant_ids)
        removing = set(hello.removing_grant_ids)
        reports_removals = not older_than(hello.version, 0, 2)
        acks: list[AgentAck] = []
        after = unacked - 1
        while after < hello.last_applied_seq:
            page = await self._store.commands_after(agent, after, BACKLOG_PAGE)
            for command in page:
                if command.seq > hello.last_applied_seq:
                    break
                if command.grant is None:
                    continue  # a lock command: the Hello says nothing of it
                grant_id = command.grant.id
                if command.kind is CommandKind.GRANT and grant_id in active:
                    status = AckStatus.APPLIED
                elif command.kind is CommandKind.REVOKE and reports_removals:
                    if grant_id in active:
                        continue
                    status = AckStatus.FAILED if grant_id in removing else AckStatus.APPLIED
                else:
                    continue
                reason = "removal pending on the host" if status is AckStatus.FAILED else ""
                acks.append(AgentAck(command.seq, status, reason, grant_id, source="hello"))
            if len(page) < BACKLOG_PAGE or not page:
                break
            after = page[-1].seq
        if acks:
            await asyncio.gather(*(self._acks.submit(_PendingAck(agent, a)) for a in acks))

    async def _hello_batch(
        self, batch: Sequence[tuple[str, AgentHello, datetime, str]]
    ) -> list[None]:
        """Each Hello's version recorded (the last item: the version recorded before it)."""
        async with self._store.transaction() as tx:
            for name, hello, now, recorded in batch:
                await tx.agent_seen(
                    name,
                    now,
                    version=hello.version[:64],
                    boot_id=hello.boot_id[:64],
                    replica=self.replica,
                )
                if not locks.keeps_locks_at(recorded) and locks.keeps_locks_at(hello.version):
                    # A 0.1 agent upgraded: it got no lock commands so far; the locks in force
                    # go into its log now (read by the resume that follows this Hello).
                    await locks.locks_for_agent(tx, name, now)
            await tx.audit_many(
                [
                    AuditEntry(
                        AuditKind.AGENT_CONNECTED,
                        f"agent:{name}",
                        now,
                        agent=name,
                        details={
                            "last_applied_seq": str(hello.last_applied_seq),
                            "version": hello.version[:64],
                        },
                    )
                    for name, hello, now, _ in batch
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
        if ack.results:
            # A snapshot's results may name only this agent's grants.
            named = [await self._store.get_grant(gid) for gid in {r.grant_id for r in ack.results}]
            foreign = [g.agent for g in named if g is not None and g.agent != principal.name]
            if foreign:
                await self._refuse_impersonation(principal, "ack", foreign[0])
                raise PermissionDenied("ack names another agent's grant")
        # The command reached the agent and was applied, the ack is not recorded yet.
        self._step(Step.AFTER_PUSH)
        await self._acks.submit(_PendingAck(principal.name, ack))

    def ack_later(self, principal: Principal, acks: Sequence[AgentAck], answer: Answer) -> None:
        """`ack` for several acks, in order, without waiting: a stream's reader goes on
        reading while they are written (each stream used to record one ack per commit).
        `answer` is called once (`GroupCommit.enqueue_all`): with None once all of them are
        durable, or with the first failure."""
        self._step(Step.AFTER_PUSH)
        name = principal.name
        self._acks.enqueue_all([_PendingAck(name, ack) for ack in acks], answer)

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
                    [(p.agent, p.ack.seq, p.ack.status.value, p.ack.reason[:256]) for p in acks],
                    now,
                )
                for acks in rounds
            ]
            self._measure(recorded, now)
            grant_ids = {grant_id for found in recorded for _, grant_id, _ in found.values()}
            grant_ids.update(r.grant_id for p in batch for r in p.ack.results)
            grants = await tx.get_grants(sorted(grant_ids))
            moves = _Moves(grants)
            entries: list[AuditEntry] = []
            for pending, k in zip(batch, round_of, strict=True):
                found = recorded[k].get((pending.agent, pending.ack.seq))
                if found is None:
                    continue  # an unknown or repeated ack
                kind, grant_id, issued_at = found
                if pending.ack.status.settles_nothing:
                    # A duplicate, or a command the agent did not apply: recorded (for the
                    # resume point). When this is the first ack the coordinator records for the
                    # command (the original was lost in a crash), the agent's result for the
                    # grant says what became of it; otherwise nothing changes.
                    grant = grants.get(grant_id)
                    result = next(
                        (r for r in pending.ack.results if grant and r.grant_id == grant.id), None
                    )
                    if grant is not None and result is not None and kind is not CommandKind.EXTEND:
                        one = AgentAck(
                            pending.ack.seq, result.status, result.reason, grant.id, source="resent"
                        )
                        at = _clamped(result.applied_at, grant, now)
                        entry = moves.ack(
                            pending.agent, grant, kind, one, now, issued_at, applied_at=at
                        )
                        if entry is not None:
                            entries.append(entry)
                            request_ids.append(grant.request_id)
                    continue
                if kind is CommandKind.SNAPSHOT:
                    # Every earlier command not yet acknowledged is replaced by the snapshot.
                    await tx.supersede_commands(pending.agent, pending.ack.seq, now)
                    for entry in moves.snapshot(pending.agent, pending.ack, now, issued_at):
                        entries.append(entry)
                        request_ids.append(entry.request_id)
                    continue
                grant = grants.get(grant_id)
                if grant is None:
                    continue
                written = moves.ack(pending.agent, grant, kind, pending.ack, now, issued_at)
                if written is not None:
                    entries.append(written)
                    request_ids.append(grant.request_id)
            for ids, expected, state, fields in moves.grouped():
                await tx.move_grants(
                    ids, expected=[expected], state=state, change=GrantChange(**fields)
                )
            # Every entry was made here (`_Moves`, ids by `new_id`): no look-up of stored ids.
            await tx.audit_many(entries, fresh=True)
        self._step(Step.AFTER_ACK)
        if request_ids:
            self._hub.requests_changed(request_ids)
        await self._hub.audit_written(tx.new_audit)
        return [None] * len(batch)

    def _measure(
        self,
        recorded: Sequence[dict[tuple[str, int], tuple[CommandKind, str, datetime]]],
        now: datetime,
    ) -> None:
        """Feed each agent's apply rate: how many of its commands this batch acks, and since
        when the oldest of them waited."""
        acked: dict[str, tuple[int, datetime, datetime]] = {}
        for found in recorded:
            for (agent, _), (_, _, created_at) in found.items():
                count, oldest, newest = acked.get(agent, (0, created_at, created_at))
                acked[agent] = (count + 1, min(oldest, created_at), max(newest, created_at))
        for agent, (count, oldest, newest) in acked.items():
            self.rates.acked(agent, count, oldest, newest, now)

    async def observed(self, principal: Principal, event: AgentObservation) -> None:
        """Store an event the agent observed on its host, once per agent and event id."""
        if not EVENT_ID.fullmatch(event.event_id):
            # Deduplication is by this id: an empty or shared id would swallow later events.
            raise InvalidArgument("event id is not valid (expected 1 to 64 of A-Za-z0-9._:-)")
        now = self._clock.now()
        details = {k[:64]: val[:256] for k, val in list(event.details.items())[:16]}
        details["observed_at"] = rfc3339(event.observed_at or now)
        if event.action:
            details["action"] = event.action[:64]
        grant = (
            await self._store.get_grant(event.grant_id) if v.ID.fullmatch(event.grant_id) else None
        )
        if grant is not None and grant.agent != principal.name:
            await self._refuse_impersonation(principal, "event", grant.agent)
            raise PermissionDenied("event names another agent's grant")
        commands: list[Command] = []
        async with self._store.transaction() as tx:
            grant = await tx.get_grant(event.grant_id) if v.ID.fullmatch(event.grant_id) else None
            if grant is not None and grant.agent != principal.name:
                raise PermissionDenied("event names another agent's grant")
            stored = await tx.audit(
                AuditEntry(
                    observed(event.kind),
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
            if event.breakglass is not None:
                # Adopted once, whichever comes first: this event or a Hello listing the use.
                await self._adopt_one(tx, principal.name, event.breakglass, now)
            if stored and grant is not None and event.kind == AuditKind.GRANT_EXPIRED:
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
            if (
                stored
                and grant is not None
                and event.kind == "grant.removed"
                and event.details.get("reason") == "released"
                and event.details.get("retried") != "true"
            ):
                # `jitmesh-agent exec --release` ended the grant on the host when its command
                # ended. The record follows as for a release asked here: REVOKING with a
                # revoke, RELEASED when the agent acks it (it holds nothing by then). A grant
                # already on its way out (released or revoked here first) is left as it is.
                _, commands = await end_grants(
                    tx,
                    [grant],
                    now,
                    by=f"agent:{principal.name}",
                    end_reason="released",
                    kind=AuditKind.GRANT_RELEASING,
                    revoke_reason="released",
                    details={"reason": "released", "source": "host"},
                    expected=REVOCABLE_GRANT_STATES,
                )
        if commands:
            self._links.push(commands)
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
            kind, details = (
                AuditKind.AGENT_EVENTS_MISSING,
                {"from": str(last + 1), "to": str(counter - 1)},
            )
        elif counter <= last:
            kind, details = (
                AuditKind.AGENT_EVENT_COUNTER_RESET,
                {"last": str(last), "now": str(counter)},
            )
        else:
            return
        await tx.audit(AuditEntry(kind, f"agent:{agent}", now, agent=agent, details=details))

    async def _refuse_version(self, principal: Principal, version: str) -> None:
        now = self._clock.now()
        async with self._store.transaction() as tx:
            await tx.audit(
                AuditEntry(
                    AuditKind.AGENT_VERSION_REFUSED,
                    f"agent:{principal.name}",
                    now,
                    agent=principal.name,
                    details={"version": version[:64], "coordinator_version": self.version},
                )
            )
        await self._hub.audit_written(tx.new_audit)

    async def message_refused(self, principal: Principal, why: str) -> None:
        """Audit a malformed message from an enrolled agent (its stream is ended by the caller).
        `why` names the field, never the value."""
        now = self._clock.now()
        async with self._store.transaction() as tx:
            await tx.audit(
                AuditEntry(
                    AuditKind.AGENT_MESSAGE_REFUSED,
                    f"agent:{principal.name}",
                    now,
                    agent=principal.name,
                    details={"why": why[:128]},
                )
            )
        await self._hub.audit_written(tx.new_audit)

    async def _refuse_impersonation(self, principal: Principal, via: str, claimed: str) -> None:
        now = self._clock.now()
        async with self._store.transaction() as tx:
            await tx.audit(
                AuditEntry(
                    AuditKind.AGENT_IMPERSONATION_REFUSED,
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
                    AuditKind.AGENT_DISCONNECTED,
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
ENROLL_BATCH = 64
# Handshake reads (credentials, agents, first unacknowledged seqs) per statement at most.
READ_BATCH = 500


@dataclass(frozen=True, slots=True)
class _Enrollment:
    join_token: str
    name: str
    labels: dict[str, str]
    # Makes the agent's credential once its token is spent (with mTLS: signs its CSR).
    issue: Callable[[str], str] | None


@dataclass(frozen=True, slots=True)
class _PendingAck:
    agent: str
    ack: AgentAck


class _Moves:
    """The grant moves of a batch of acks, worked out in order in memory (the batch is one
    transaction under the store's writer lock, so what was read is what is there), then written
    as one compare-and-set per (from, to, columns) group. The outcome is the same as moving
    grant by grant, ack by ack.

    The record says what the agent did and nothing else: an audit entry is written for a move
    that happens, for a refusal or failure the agent reports, and for an application reported
    after the grant had ended here (noted as late, the grant stays ended); never for an ack that
    moves nothing it could truthfully report."""

    def __init__(self, grants: dict[str, Grant]) -> None:
        self._grants = grants
        self._start = {gid: g.state for gid, g in grants.items()}
        self._state = dict(self._start)
        self._applied = {gid for gid, g in grants.items() if g.applied_at is not None}
        self._fields: dict[str, dict[str, Any]] = {}

    def _move(
        self, grant_id: str, expected: tuple[GrantState, ...], state: GrantState, **fields: Any
    ) -> bool:
        if self._state[grant_id] in expected:
            self._state[grant_id] = state
            self._fields.setdefault(grant_id, {}).update(fields)
            return True
        return False

    def snapshot(
        self, agent: str, ack: AgentAck, now: datetime, issued_at: datetime
    ) -> list[AuditEntry]:
        """Book a snapshot's per-grant results. A result counts as the grant command's ack when
        the grant came before the snapshot (grant_seq below it), as its revoke's ack when the
        revoke did (a tombstone of the snapshot); a result for anything else moves nothing."""
        entries: list[AuditEntry] = []
        for result in ack.results:
            grant = self._grants.get(result.grant_id)
            if grant is None or grant.agent != agent or result.status.settles_nothing:
                continue
            if 0 < grant.revoke_seq < ack.seq:
                kind = CommandKind.REVOKE
            elif 0 < grant.grant_seq < ack.seq:
                kind = CommandKind.GRANT
            else:
                continue
            applied_at = _clamped(result.applied_at, grant, now)
            one = AgentAck(ack.seq, result.status, result.reason, grant.id, source="snapshot")
            entry = self.ack(agent, grant, kind, one, now, issued_at, applied_at=applied_at)
            if entry is not None:
                entries.append(entry)
        return entries

    def ack(
        self,
        agent: str,
        grant: Grant,
        kind: CommandKind,
        ack: AgentAck,
        now: datetime,
        issued_at: datetime,
        *,
        applied_at: datetime | None = None,
    ) -> AuditEntry | None:
        """Move the grant as this ack says; the audit entry it gets, if any."""
        # From the command's commit to the agent's ack: the propagation a revoke receipt shows.
        latency_ms = str(int((now - issued_at).total_seconds() * 1000))
        details = {"action": grant.action, "seq": str(ack.seq)}
        if ack.source:
            details["source"] = ack.source
        reason = ack.reason[:256]
        at = applied_at or now
        if kind is CommandKind.EXTEND:
            # The grant stays as it is: only its end moved (and was audited grant.extended
            # when decided). The ack says whether the host has the new end.
            applied = ack.status == "APPLIED"
            what = (
                AuditKind.GRANT_EXTENSION_APPLIED if applied else AuditKind.GRANT_EXTENSION_FAILED
            )
            details["not_after"] = rfc3339(grant.not_after)
            if applied:
                details["latency_ms"] = latency_ms
            else:
                details.update(status=ack.status, reason=reason)
        elif kind is CommandKind.GRANT and ack.status is AckStatus.APPLIED:
            if grant.id in self._applied:
                return None  # already recorded as applied: nothing new to say
            self._applied.add(grant.id)
            if not self._move(
                grant.id, (GrantState.PENDING_DELIVERY,), GrantState.ACTIVE, applied_at=at
            ):
                # Ended here before the ack arrived (expired, revoked): the host did hold it,
                # so that is recorded, but the grant stays ended.
                current = self._state[grant.id]
                self._move(grant.id, (current,), current, applied_at=at)
                details["late"] = "true"
                details["state"] = current.value
            what = AuditKind.GRANT_APPLIED
            details["latency_ms"] = latency_ms
        elif kind is CommandKind.GRANT:
            ended = GrantState.EXPIRED if now >= grant.not_after else GrantState.FAILED
            self._move(
                grant.id, (GrantState.PENDING_DELIVERY,), ended, failure=reason, ended_at=now
            )
            what = AuditKind.GRANT_APPLY_FAILED
            details.update(status=ack.status.value, reason=reason)
        elif ack.status is AckStatus.APPLIED:
            state = GrantState.RELEASED if grant.end_reason == "released" else GrantState.REVOKED
            if not self._move(
                grant.id, (GrantState.REVOKING, GrantState.REVOKE_FAILED), state, ended_at=now
            ):
                return None  # already ended here (expired, or this revoke's earlier ack)
            what = (
                AuditKind.GRANT_RELEASED
                if state is GrantState.RELEASED
                else AuditKind.GRANT_REVOKED
            )
            details["latency_ms"] = latency_ms
        else:
            if (
                not self._move(
                    grant.id, (GrantState.REVOKING,), GrantState.REVOKE_FAILED, failure=reason
                )
                and self._state[grant.id] is GrantState.REVOKE_FAILED
            ):
                return None  # already known to have failed
            what = AuditKind.GRANT_REVOKE_FAILED
            details.update(status=ack.status.value, reason=reason)
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

    def grouped(self) -> list[tuple[list[str], GrantState, GrantState, dict[str, Any]]]:
        groups: dict[tuple[Any, ...], list[str]] = {}
        for grant_id, fields in self._fields.items():
            start, state = self._start[grant_id], self._state[grant_id]
            key = (start, state, tuple(sorted(fields.items())))
            groups.setdefault(key, []).append(grant_id)
        return [(ids, start, state, dict(fields)) for (start, state, fields), ids in groups.items()]


def _clamped(applied_at: datetime | None, grant: Grant, now: datetime) -> datetime:
    """When the agent says it applied the grant, by its clock: never before the grant existed,
    never after the ack arrived (now, when it does not say)."""
    if applied_at is None:
        return now
    return max(grant.created_at, min(applied_at, now))
