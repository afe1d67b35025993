"""Requests and grants: create, review, cancel, revoke, release. Each operation is one store
transaction that also writes its audit events; pushes and notifications follow the commit."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from jitmesh import validation as v
from jitmesh.clock import Clock, from_ms, rfc3339, to_ms
from jitmesh.durations import MAX_DURATION, format_duration
from jitmesh.types import (
    Agent,
    ApprovalPlan,
    Grant,
    GrantState,
    Lock,
    Request,
    RequestOption,
    RequestState,
    Review,
    ReviewDecision,
)

from .approval import (
    DAY,
    SELF_REVIEW,
    Outcome,
    Usage,
    apply_review,
    auto_decision,
    budget_usage,
    plan_of,
    recorded_groups,
    review_refusal,
)
from .batching import GroupCommit
from .delivery import DeliveryGate
from .errors import (
    Conflict,
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    PolicyDenied,
    SelfApproval,
    invalid_input,
)
from .grants import end_grants, extend_grant, extension_problem, write_grants
from .hub import Hub
from .lifecycle import ENDABLE_GRANT_STATES, EXTENDABLE_GRANT_STATES
from .locks import first_lock, first_lock_at, lock_refusal, refuse_if_locked
from .models import (
    AuditEntry,
    AuditKind,
    Command,
    CommandKind,
    Principal,
    new_id,
    same_person,
    user_name,
)
from .policy import Policy, Rule, match, pending_ttl, plan_for, unknown_action
from .ports import CommandSink, Store, Tx
from .reads import Readers, View, view_of, visible_page
from .steps import Step, StepHook, no_hook

log = logging.getLogger(__name__)
MIN_DURATION = timedelta(seconds=1)
MAX_PAGE = 1000
MAX_TICKET = 128
WATCH_PAGE = 500


def plan_groups_in_order(plan: ApprovalPlan) -> list[str]:
    """The approver groups of every stage, first mention first (the request's summary)."""
    return list(dict.fromkeys(g for s in plan.stages for g in s.groups))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class _Target:
    """What a new request reads before it is judged: its agent, and a lock for it at `now`."""

    agent: str
    subject: str
    action: str
    now: datetime


# Requests whose agent and lock reads share one read at most.
READ_BATCH = 500


@dataclass(frozen=True, slots=True)
class _Creation:
    """A checked request waiting for its group commit, with its grant when policy approves it."""

    actor: str
    request: Request
    grant: Grant | None
    # The agent's undelivered commands when the request was checked (delivery.py).
    undelivered: int = 0
    # An automatic approval under a budget: the rule, and the request as it is when the
    # budget turns out to be used up inside the writing transaction (waiting for people).
    budget: tuple[Rule, Request] | None = None


def _end_refusal(principal: Principal, grant: Grant, how: str) -> str:
    """Why `principal` may not end `grant`, and who may: its subject releases it, its
    approvers and admins revoke it."""
    if how == "released":
        return (
            f"{principal.name} may not release this grant: only its subject {grant.subject} "
            f"may; approvers and admins end it with 'jitctl grant revoke {grant.id}'"
        )
    if same_person(principal.name, grant.subject):
        return (
            f"{principal.name} may not revoke this grant (its approvers and admins may); as "
            f"its subject, end it with 'jitctl grant release {grant.id}'"
        )
    return f"{principal.name} may not revoke this grant: only its approvers and admins may"


class AccessService:
    def __init__(
        self,
        store: Store,
        links: CommandSink,
        hub: Hub,
        clock: Clock,
        policy: Callable[[], Policy],
        epoch: int,
        deadlines_changed: Callable[[], None],
        refresh_policy: Callable[[], Awaitable[object]] | None = None,
        readers: Readers | None = None,
        *,
        delivery: DeliveryGate | None = None,
        step: StepHook = no_hook,
    ) -> None:
        """`refresh_policy` (replicas): called before each request is judged, so a policy
        applied on another replica is in force here from the next call. `step` is told each
        step of an approval (the fault suite's crash points; nothing in production)."""
        self._step = step
        self._refresh_policy = refresh_policy
        self._readers = readers or Readers()
        self._store = store
        # Grant commands an agent would not get in time are refused (delivery.py); None: never.
        self._delivery = delivery
        # The last command seq this process gave each agent: a caller's look-up of the agent
        # may predate a batch committed since, and must not miss that batch's commands.
        self._appended: dict[str, int] = {}
        self._links = links
        self._hub = hub
        self._clock = clock
        self._policy = policy
        self._epoch = epoch
        self._deadlines_changed = deadlines_changed
        self._creations = GroupCommit(self._create_many)
        # The agent and the locks in force, one read for all the requests that asked before it
        # started (each request's read starts after it arrived, so it sees every lock and
        # enrollment committed before; locks are checked again in the writing transaction).
        self._targets = GroupCommit(self._read_targets, READ_BATCH)

    @property
    def creations_waiting(self) -> int:
        """Checked requests waiting for their group commit (for tests and metrics)."""
        return self._creations.waiting

    async def create_request(
        self,
        principal: Principal,
        *,
        agent: str,
        action: str,
        duration: timedelta,
        reason: str,
        ticket: str = "",
        start_at: datetime | None = None,
        selector: dict[str, str] | None = None,
        _extends: Grant | None = None,
    ) -> tuple[Request, Grant | None]:
        """A new request, checked against the policy and locks. A request for an agent and
        action the caller already holds live reuses that grant (extending it in place when more
        time is asked for and the rule allows it) instead of asking approvers again.
        `_extends`: make the pending request that extends this grant once approved.
        `selector` instead of `agent`: every agent with those labels, one grant each."""
        if selector:
            return await self._create_for_selector(
                principal,
                selector=selector,
                action=action,
                duration=duration,
                reason=reason,
                ticket=ticket,
            )
        with invalid_input():
            v.check(v.AGENT, agent, "agent")
            v.check(v.ACTION, action, "action")
            v.check_reason(reason)
            v.check_reason(ticket, field="ticket")
        if len(ticket) > MAX_TICKET:
            raise InvalidArgument(f"ticket is longer than {MAX_TICKET} characters")
        if duration < MIN_DURATION:
            raise InvalidArgument("duration must be at least 1s")
        if duration > MAX_DURATION:
            raise InvalidArgument("duration must be at most 366d")
        if self._refresh_policy is not None:
            await self._refresh_policy()
        policy = self._policy()
        if action not in policy.model.actions:
            raise InvalidArgument(unknown_action(action, policy))
        # Whole milliseconds, as stored: the request is returned as built, not read back.
        now = from_ms(to_ms(self._clock.now()))
        target, lock = await self._targets.submit(_Target(agent, principal.name, action, now))
        if target is None:
            raise NotFound(f"agent {agent} is not enrolled")
        if start_at is not None:
            start_at = from_ms(to_ms(start_at))
            if start_at <= now:
                start_at = None  # a start in the past is now
            elif start_at - now > MAX_DURATION:
                raise InvalidArgument("start must be within 366d")
        if lock is not None:
            await self._refused(principal.name, agent, action, f"locked by {lock.id}")
            raise lock_refusal(lock)
        found = match(policy, principal, action, agent, target.labels)
        rule = found.rule
        if rule is None:
            await self._refused(principal.name, agent, action, found.explanation)
            raise PolicyDenied(f"{principal.name} may not {action} on {agent}: {found.explanation}")
        if duration > rule.max_duration:
            raise InvalidArgument(
                f"duration {format_duration(duration)} is above the maximum "
                f"{format_duration(rule.max_duration)} of rule {rule.name}"
            )
        if rule.reason == "required" and not reason.strip():
            raise InvalidArgument(f"rule {rule.name} requires a reason")
        if rule.ticket is not None and not rule.ticket_ok(ticket):
            raise InvalidArgument(
                f"rule {rule.name} requires a ticket id matching {rule.ticket} (--ticket)"
            )
        auto = False
        if _extends is None:
            auto, _ = await self._automatic(principal.name, rule, duration, now)
        if _extends is None and not auto and start_at is None:
            # Reuse spares approvers a question already answered. An automatic approval asks
            # nobody, so it makes its own grant (overlapping grants are reference-counted on
            # the host, and a caller may release its own without touching another).
            live = await self._live_grant(principal.name, agent, action)
            if live is not None:
                reused = await self._reuse(principal, live, rule, duration, reason, ticket, now)
                if reused is not None:
                    return reused
        plan = replace(plan_for(policy, rule), automatic=auto)
        request = Request(
            id=new_id("req"),
            subject=principal.name,
            agent=agent,
            action=action,
            duration=duration,
            reason=reason,
            state=RequestState.PENDING,
            rule=rule.name,
            approvals_required=0 if auto else sum(s.approvals for s in plan.stages),
            approver_groups=() if auto else tuple(plan_groups_in_order(plan)),
            reviews=(),
            created_at=now,
            pending_expires_at=None if auto else now + pending_ttl(policy, rule),
            decided_at=None,
            decided_by="",
            decision_reason="",
            grant_id="",
            grant_state=None,
            plan=plan,
            ticket=ticket,
            extends_grant_id=_extends.id if _extends is not None else "",
            start_at=start_at,
        )
        grant: Grant | None = None
        budget: tuple[Rule, Request] | None = None
        undelivered = self._undelivered(agent, target.last_seq, target.last_acked_seq)
        if auto and start_at is None and rule.approval.auto and rule.approval.auto.budget:
            # The budget read above is checked again where the grant is written (one
            # transaction): two requests at once never both fit a budget of one.
            people = replace(plan_for(policy, rule), automatic=False)
            budget = (
                rule,
                replace(
                    request,
                    plan=people,
                    approvals_required=sum(s.approvals for s in people.stages),
                    approver_groups=tuple(plan_groups_in_order(people)),
                    pending_expires_at=now + pending_ttl(policy, rule),
                ),
            )
        if auto and start_at is not None:
            # Approved now, issued at the start (eligibility and locks checked again then).
            request = replace(
                request,
                state=RequestState.SCHEDULED,
                decided_at=now,
                decided_by=f"policy:{rule.name}",
            )
        elif auto:
            grant = self._new_grant(request, rule, now)
            # Early, before the batch: the batch checks again with the batch's own commands.
            self._refuse_if_behind(agent, undelivered, duration)
        return await self._creations.submit(
            _Creation(principal.name, request, grant, undelivered, budget)
        )

    async def _read_targets(
        self, asked: Sequence[_Target]
    ) -> list[tuple[Agent | None, Lock | None]]:
        # Locks in force at the earliest caller's time, then each caller's at its own time.
        agents, locks = await self._store.agents_and_locks(
            list({t.agent for t in asked}), min(t.now for t in asked)
        )
        return [
            (agents.get(t.agent), first_lock_at(locks, t.subject, t.agent, t.action, t.now))
            for t in asked
        ]

    def _undelivered(self, agent: str, last_seq: int, last_acked_seq: int) -> int:
        return max(0, max(last_seq, self._appended.get(agent, 0)) - last_acked_seq)

    def _appended_seq(self, agent: str, seq: int) -> None:
        if self._delivery is not None and seq > self._appended.get(agent, 0):
            self._appended[agent] = seq

    def _refuse_if_behind(self, agent: str, undelivered: int, duration: timedelta) -> None:
        """Overloaded when the agent would not get one more grant command in time."""
        if self._delivery is not None:
            pushback = self._delivery.check(agent, undelivered, duration)
            if pushback is not None:
                raise Overloaded(pushback)

    async def _create_for_selector(
        self,
        principal: Principal,
        *,
        selector: dict[str, str],
        action: str,
        duration: timedelta,
        reason: str,
        ticket: str,
    ) -> tuple[Request, Grant | None]:
        """One request for every agent whose labels match `selector`: one plan (all of them
        must fall under the same allow rule), one approval, and at approval a grant per agent
        matching then (each pushed and tracked on its own)."""
        with invalid_input():
            v.check_labels(selector, field="selector")
            v.check(v.ACTION, action, "action")
            v.check_reason(reason)
            v.check_reason(ticket, field="ticket")
        if duration < MIN_DURATION or duration > MAX_DURATION:
            raise InvalidArgument("duration must be between 1s and 366d")
        policy = self._policy()
        now = from_ms(to_ms(self._clock.now()))
        agents = [a for a in await self._store.list_agents() if _selects(selector, a.labels)]
        if not agents:
            raise NotFound("no enrolled agent has these labels")
        rules: dict[str, Rule] = {}
        for target in agents:
            found = match(policy, principal, action, target.name, target.labels)
            if found.rule is None:
                await self._refused(principal.name, target.name, action, found.explanation)
                raise PolicyDenied(
                    f"{principal.name} may not {action} on {target.name}: {found.explanation}"
                )
            rules[found.rule.name] = found.rule
        if len(rules) > 1:
            raise InvalidArgument(
                "the selector spans agents under different rules ("
                + ", ".join(sorted(rules))
                + "): ask for each group of agents on its own"
            )
        (rule,) = rules.values()
        if duration > rule.max_duration:
            raise InvalidArgument(
                f"duration {format_duration(duration)} is above the maximum "
                f"{format_duration(rule.max_duration)} of rule {rule.name}"
            )
        if rule.reason == "required" and not reason.strip():
            raise InvalidArgument(f"rule {rule.name} requires a reason")
        if rule.ticket is not None and not rule.ticket_ok(ticket):
            raise InvalidArgument(
                f"rule {rule.name} requires a ticket id matching {rule.ticket} (--ticket)"
            )
        auto, _ = await self._automatic(principal.name, rule, duration, now)
        plan = replace(plan_for(policy, rule), automatic=auto)
        request = Request(
            id=new_id("req"),
            subject=principal.name,
            agent="",
            action=action,
            duration=duration,
            reason=reason,
            state=RequestState.PENDING,
            rule=rule.name,
            approvals_required=0 if auto else sum(s.approvals for s in plan.stages),
            approver_groups=() if auto else tuple(plan_groups_in_order(plan)),
            reviews=(),
            created_at=now,
            pending_expires_at=None if auto else now + pending_ttl(policy, rule),
            decided_at=None,
            decided_by="",
            decision_reason="",
            grant_id="",
            grant_state=None,
            plan=plan,
            ticket=ticket,
            selector=dict(selector),
        )
        commands: list[Command] = []
        async with self._store.transaction() as tx:
            await tx.insert_requests([request])
            await tx.audit(
                self._entry(
                    AuditKind.REQUEST_CREATED,
                    principal.name,
                    request,
                    rule=rule.name,
                    selector=_labels_text(selector),
                    agents=",".join(a.name for a in agents),
                )
            )
            if auto:
                commands = await self._grant_selected(
                    tx, request, rule, f"policy:{rule.name}", "", now
                )
        grant = commands[0].grant if commands else None
        await self._after(tx, request.id, None, None)
        self._links.push(commands)
        stored = await self._store.get_request(request.id)
        assert stored is not None
        return self.shown(stored), grant

    async def _grant_selected(
        self, tx: Tx, request: Request, rule: Rule, by: str, reason: str, now: datetime
    ) -> list[Command]:
        """Approve a selector request: a grant for each agent matching it now (an agent under
        a lock gets none, audited), the request APPROVED with the first as its grant."""
        in_force = await tx.locks_in_force(now)
        grants: list[Grant] = []
        for target in await tx.list_agents():
            if not _selects(request.selector, target.labels):
                continue
            one = replace(request, agent=target.name)
            lock = first_lock(in_force, one)
            if lock is not None:
                await tx.audit(
                    AuditEntry(
                        AuditKind.REQUEST_REFUSED,
                        by,
                        now,
                        subject=request.subject,
                        agent=target.name,
                        request_id=request.id,
                        details={"action": request.action, "why": f"locked by {lock.id}"},
                    )
                )
                continue
            grants.append(self._new_grant(one, rule, now))
        if not grants:
            raise Conflict("no agent matching the selector can be granted now (none, or locked)")
        seqs = await tx.append_commands([(g.agent, CommandKind.GRANT, g.id, now) for g in grants])
        numbered = [replace(g, grant_seq=seq) for g, seq in zip(grants, seqs, strict=True) if seq]
        await self._decide(tx, request, RequestState.APPROVED, by, reason, numbered[0].id)
        await tx.set_request_grants(request.id, [g.id for g in numbered])
        return await write_grants(
            tx, [(replace(request, agent=g.agent), g, by) for g in numbered], now
        )

    def policy_version(self) -> int:
        return self._policy().version

    async def options(
        self, principal: Principal, *, agent: str = "", action: str = ""
    ) -> list[RequestOption]:
        """What the caller may ask for now: each agent and action some allow rule gives them,
        with the longest duration and the approval a request would get (automatic or its
        stages), budgets left and any live grant a request would reuse."""
        with invalid_input():
            if agent:
                v.check(v.AGENT, agent, "agent")
            if action:
                v.check(v.ACTION, action, "action")
        policy = self._policy()
        now = self._clock.now()
        agents = [a for a in await self._store.list_agents() if not agent or a.name == agent]
        if agent and not agents:
            raise NotFound(f"agent {agent} is not enrolled")
        held, _ = await self._store.list_grants(
            states=sorted(EXTENDABLE_GRANT_STATES),
            subject=principal.name,
            agent=agent,
            limit=MAX_PAGE,
            page_token="",
        )
        live = {(g.agent, g.action): g.id for g in await self._reusable(held)}
        out: list[RequestOption] = []
        usage_of: dict[str, Usage] = {}
        for target in agents:
            for name in policy.model.actions:
                if action and name != action:
                    continue
                rule = match(policy, principal, name, target.name, target.labels).rule
                if rule is None:
                    continue
                auto = rule.approval.auto
                left: int | None = None
                time_left: timedelta | None = None
                automatic = rule.approval.always_auto
                if auto is not None and auto.limited:
                    if rule.name not in usage_of:
                        usage_of[rule.name] = budget_usage(
                            await self._store.recent_auto_grants(
                                principal.name, rule.name, now - DAY
                            ),
                            now,
                        )
                    usage = usage_of[rule.name]
                    automatic, _ = auto_decision(auto, usage, MIN_DURATION, now)
                    if auto.budget is not None and auto.budget.count is not None:
                        left = max(auto.budget.count - usage.grants, 0)
                    if auto.budget is not None and auto.budget.granted is not None:
                        time_left = max(auto.budget.granted - usage.granted, timedelta(0))
                out.append(
                    RequestOption(
                        agent=target.name,
                        labels=dict(target.labels),
                        action=name,
                        max_duration=rule.max_duration,
                        plan=replace(plan_for(policy, rule), automatic=automatic),
                        automatic_left=left,
                        granted_time_left=time_left,
                        live_grant_id=live.get((target.name, name), ""),
                    )
                )
        return out

    async def _live_grant(self, subject: str, agent: str, action: str) -> Grant | None:
        """The caller's live grant for this agent and action that ends last, among those a
        request may reuse (`_reusable`), if any."""
        held, _ = await self._store.list_grants(
            states=sorted(EXTENDABLE_GRANT_STATES),
            subject=subject,
            agent=agent,
            limit=MAX_PAGE,
            page_token="",
        )
        mine = await self._reusable([g for g in held if g.action == action])
        return max(mine, key=lambda g: g.not_after) if mine else None

    async def _reusable(self, grants: Sequence[Grant]) -> list[Grant]:
        """The grants a new request may be answered with: those people approved. Reuse spares
        approvers a question they already answered; a grant the policy approved by itself (or
        a break-glass grant) answered no person, so it never stands in for their approval."""
        out = []
        for grant in grants:
            if grant.breakglass_code_id or not grant.request_id:
                continue
            request = await self._store.get_request(grant.request_id)
            if request is not None and any(
                r.decision is ReviewDecision.APPROVE for r in request.reviews
            ):
                out.append(grant)
        return out

    async def _reuse(
        self,
        principal: Principal,
        live: Grant,
        rule: Rule,
        duration: timedelta,
        reason: str,
        ticket: str,
        now: datetime,
    ) -> tuple[Request, Grant | None] | None:
        """Answer a request with the live grant `live`: as it is when it lasts long enough,
        else extended (in place, or by a pending extension request where the rule wants
        approval again). None when the rule cannot extend it that far: a new request then."""
        short = now + duration - live.not_after
        if short > timedelta(0):
            if extension_problem(rule, live, short):
                return None
            if rule.extend.approval == "again":
                return await self.create_request(
                    principal,
                    agent=live.agent,
                    action=live.action,
                    duration=short,
                    reason=reason,
                    ticket=ticket,
                    _extends=live,
                )
            live = await self._extend_now(principal.name, live, short, reason, rule)
        request = Request(
            id=new_id("req"),
            subject=principal.name,
            agent=live.agent,
            action=live.action,
            duration=duration,
            reason=reason,
            state=RequestState.APPROVED,
            rule=rule.name,
            approvals_required=0,
            approver_groups=(),
            reviews=(),
            created_at=now,
            pending_expires_at=None,
            decided_at=now,
            decided_by="reused",
            decision_reason=f"the live grant {live.id} covers it",
            grant_id=live.id,
            grant_state=live.state,
            ticket=ticket,
            reused=True,
        )
        async with self._store.transaction() as tx:
            await tx.insert_requests([request])
            await tx.audit(
                self._entry(
                    AuditKind.REQUEST_REUSED,
                    principal.name,
                    request,
                    grant_id=live.id,
                    extended="yes" if short > timedelta(0) else "",
                )
            )
        self._hub.requests_changed([request.id])
        await self._hub.audit_written(tx.new_audit)
        return request, live

    async def _automatic(
        self, subject: str, rule: Rule, duration: timedelta, now: datetime
    ) -> tuple[bool, tuple[str, ...]]:
        """Whether the policy approves by itself now, with its notes (windows, budget)."""
        auto = rule.approval.auto
        if auto is None:
            return False, ()
        usage = Usage(0, timedelta(0))
        if auto.budget is not None:
            usage = budget_usage(
                await self._store.recent_auto_grants(subject, rule.name, now - DAY), now
            )
        return auto_decision(auto, usage, duration, now)

    async def _create_many(
        self, items: Sequence[_Creation]
    ) -> list[tuple[Request, Grant | None] | Exception]:
        """Group commit of `create_request`: the requests, their grants, commands and audit
        events written by one statement each, in one transaction. Policy-approved requests
        are stored already APPROVED (nobody can see them PENDING inside the transaction); the
        audit shows the same events as one by one: created, approved, grant created."""
        now = from_ms(to_ms(self._clock.now()))
        out: list[tuple[Request, Grant | None] | Exception] = []
        requests: list[Request] = []
        approved: list[tuple[Request, Grant, str]] = []
        entries: list[AuditEntry] = []
        async with self._store.transaction() as tx:
            # Budgets too: the usage read when each request was checked may be stale by now
            # (another request committed meanwhile, or is in this very batch).
            items = await self._within_budgets(tx, items, now)
            # Locks are checked again inside the transaction, before any sequence number is
            # given out: a lock committed after a caller's own check refuses it here.
            in_force = await tx.locks_in_force(now)
            locked = {
                k: lock
                for k, item in enumerate(items)
                if (lock := first_lock(in_force, item.request)) is not None
            }
            behind = self._behind(items, locked)
            seqs = iter(
                await tx.append_commands(
                    [
                        (i.grant.agent, CommandKind.GRANT, i.grant.id, now)
                        for k, i in enumerate(items)
                        if i.grant and k not in locked and k not in behind
                    ]
                )
            )
            for k, item in enumerate(items):
                request, grant = item.request, item.grant
                if k in behind:
                    out.append(behind[k])
                    continue
                if k in locked:
                    lock = locked[k]
                    entries.append(
                        AuditEntry(
                            AuditKind.REQUEST_REFUSED,
                            item.actor,
                            now,
                            subject=request.subject,
                            agent=request.agent,
                            details={"action": request.action, "why": f"locked by {lock.id}"},
                        )
                    )
                    out.append(lock_refusal(lock))
                    continue
                entries.append(
                    self._entry(
                        AuditKind.REQUEST_CREATED,
                        item.actor,
                        request,
                        rule=request.rule,
                        policy_version=str(request.plan.policy_version if request.plan else ""),
                        ticket=request.ticket,
                    )
                )
                if request.state is RequestState.SCHEDULED:
                    entries.append(self._scheduled_entry(request.decided_by, request))
                if grant is not None:
                    seq = next(seqs)
                    if seq is None:
                        # Removed since the look-up: this one fails, the batch goes on.
                        out.append(Conflict(f"agent {grant.agent} is not enrolled"))
                        entries.pop()
                        continue
                    by = f"policy:{request.rule}"
                    self._appended_seq(grant.agent, seq)
                    grant = replace(grant, grant_seq=seq)
                    request = replace(
                        request,
                        state=RequestState.APPROVED,
                        decided_at=now,
                        decided_by=by,
                        grant_id=grant.id,
                        grant_state=grant.state,
                    )
                    approved.append((request, grant, by))
                requests.append(request)
                out.append((request, grant))
            await tx.insert_requests(requests)
            commands = await write_grants(tx, approved, now, audit_first=entries)
            self._step(Step.BEFORE_COMMIT)
        if commands:
            self._step(Step.AFTER_COMMIT)
        try:
            # Committed: nothing below may fail the batch, or GroupCommit would write each
            # request again (the push and the notices are hints; the log and the store are not).
            self._links.push(commands)
            self._deadlines_changed()
            self._hub.requests_changed([r.id for r in requests])
            await self._hub.audit_written(tx.new_audit)
        except Exception:
            log.exception("after a committed batch of %d requests", len(requests))
        return out

    async def _within_budgets(
        self, tx: Tx, items: Sequence[_Creation], now: datetime
    ) -> list[_Creation]:
        """`items`, where an automatic approval that no longer fits its rule's budget (counting
        what is committed and what this batch approves before it) waits for people instead."""
        out: list[_Creation] = []
        used: dict[tuple[str, str], list[tuple[datetime, datetime, datetime | None]]] = {}
        for item in items:
            if item.budget is None or item.grant is None:
                out.append(item)
                continue
            rule, people = item.budget
            key = (item.request.subject, rule.name)
            if key not in used:
                used[key] = await tx.recent_auto_grants(key[0], key[1], now - DAY)
            auto = rule.approval.auto
            assert auto is not None
            fits, _ = auto_decision(auto, budget_usage(used[key], now), item.request.duration, now)
            if fits:
                used[key].append((item.grant.not_before, item.grant.not_after, None))
                out.append(item)
            else:
                out.append(replace(item, request=people, grant=None, budget=None))
        return out

    def _behind(
        self, items: Sequence[_Creation], skipped: Collection[int]
    ) -> dict[int, Overloaded]:
        """The batch's grants refused for delivery: each agent's undelivered commands as read
        by its callers, plus those this batch gives it ahead of each one."""
        refused: dict[int, Overloaded] = {}
        if self._delivery is None:
            return refused
        added: dict[str, int] = {}
        for k, item in enumerate(items):
            grant = item.grant
            if grant is None or k in skipped:
                continue
            ahead = item.undelivered + added.get(grant.agent, 0)
            pushback = self._delivery.check(grant.agent, ahead, item.request.duration)
            if pushback is not None:
                refused[k] = Overloaded(pushback)
            else:
                added[grant.agent] = added.get(grant.agent, 0) + 1
        return refused

    async def review(
        self, principal: Principal, request_id: str, decision: ReviewDecision, reason: str
    ) -> tuple[Request, Grant | None]:
        with invalid_input():
            v.check_reason(reason)
        grant: Grant | None = None
        command: Command | None = None
        more: list[Command] = []
        # The request as it is after this review, built rather than read back after the commit
        # (one read less on the approval path); None where that is not simple (several grants,
        # an extension): read back then.
        built: Request | None = None
        async with self._store.transaction() as tx:
            request = await self._get_request(tx, request_id)
            # Whole milliseconds, as stored, so the built request equals the stored one.
            now = from_ms(to_ms(self._clock.now()))
            _still_pending(request, now)
            plan, before = self.outcome(request, now)
            # The rules are apply_review's; asking first means nobody's review is silently
            # ignored: a review that would not count is refused with the reason.
            refusal = review_refusal(
                plan, before, principal, decision, now, requester=request.subject
            )
            if refusal == SELF_REVIEW:
                raise SelfApproval(refusal)
            if refusal:
                raise PermissionDenied(refusal)
            review = Review(
                principal.name, decision, reason, now, recorded_groups(plan, principal),
                via=principal.via,
            )  # fmt: skip
            if not await tx.insert_review(request.id, review):
                raise Conflict("you have already reviewed this request")
            # Judged in arrival order (as before); the answer lists them as a read does, by
            # time then reviewer (two reviews in one millisecond keep arrival order here).
            after = self._apply(plan, request, (*request.reviews, review), now)
            reviews = tuple(
                sorted((*request.reviews, review), key=lambda r: (r.reviewed_at, r.reviewer))
            )
            decided = replace(
                request,
                reviews=reviews,
                decided_at=now,
                decided_by=principal.actor,
                decision_reason=reason,
            )
            if after.state is RequestState.DENIED:
                # Deny wins: one denial ends the request whatever approvals it already has.
                await self._decide(
                    tx, request, RequestState.DENIED, principal.actor, reason, at=now
                )
                await tx.audit(
                    self._entry(AuditKind.REQUEST_DENIED, principal.actor, request, why=reason)
                )
                built = replace(decided, state=RequestState.DENIED)
            elif after.state is RequestState.APPROVED:
                # A new event (its id made now): no look-up of stored ids.
                await tx.audit_many(
                    [self._reviewed(principal.actor, request, plan, before.stage)], fresh=True
                )
                rule = self._rule(request.rule)
                if request.start_at is not None and request.start_at > now:
                    # Approved; the grant is issued at the start, after a second look.
                    await self._decide(
                        tx, request, RequestState.SCHEDULED, principal.actor, reason, at=now
                    )
                    await tx.audit(self._scheduled_entry(principal.actor, request))
                    built = replace(decided, state=RequestState.SCHEDULED)
                elif request.selector:
                    more = await self._grant_selected(
                        tx, request, rule, principal.actor, reason, now
                    )
                    grant = more[0].grant
                else:
                    grant, command = await self._approve(
                        tx, request, rule, principal.actor, reason, now=now
                    )
                    if not request.extends_grant_id:
                        built = replace(
                            decided,
                            state=RequestState.APPROVED,
                            grant_id=grant.id,
                            grant_state=grant.state,
                        )
            else:
                await tx.audit(self._reviewed(principal.actor, request, plan, before.stage))
                if after.stage > before.stage:
                    # A stage passed and the next one's approvers are waiting: a notice for them.
                    passed = plan.stages[before.stage].name
                    opened = plan.stages[after.stage].name if after.stage < len(plan.stages) else ""
                    await tx.audit(
                        self._entry(
                            AuditKind.REQUEST_STAGE_APPROVED, principal.actor, request,
                            stage=passed, next_stage=opened,
                        )
                    )  # fmt: skip
                built = replace(request, reviews=reviews)
        self._links.push(more)
        return await self._after(tx, request_id, grant, command, built)

    def outcome(self, request: Request, now: datetime) -> tuple[ApprovalPlan, Outcome]:
        """The request's plan and where its approval stands at `now`."""
        plan = plan_of(request)
        return plan, self._apply(plan, request, request.reviews, now)

    @staticmethod
    def _apply(
        plan: ApprovalPlan, request: Request, reviews: Sequence[Review], now: datetime
    ) -> Outcome:
        deadline = request.pending_expires_at or request.created_at
        return apply_review(
            plan,
            reviews,
            now,
            requester=request.subject,
            opened_at=request.created_at,
            deadline=deadline,
        )

    def _reviewed(self, actor: str, request: Request, plan: ApprovalPlan, stage: int) -> AuditEntry:
        name = plan.stages[stage].name if stage < len(plan.stages) else ""
        return self._entry(AuditKind.REQUEST_REVIEWED, actor, request, stage=name)

    async def cancel(self, principal: Principal, request_id: str) -> Request:
        async with self._store.transaction() as tx:
            request = await self._get_request(tx, request_id)
            if not (same_person(principal.name, request.subject) or principal.is_admin):
                raise PermissionDenied("only the requester or an admin may cancel a request")
            if request.state is RequestState.SCHEDULED:
                await self._decide(
                    tx,
                    request,
                    RequestState.CANCELLED,
                    principal.name,
                    "cancelled",
                    expected=RequestState.SCHEDULED,
                )
            else:
                _still_pending(request, self._clock.now())
                await self._decide(tx, request, RequestState.CANCELLED, principal.name, "cancelled")
            await tx.audit(self._entry(AuditKind.REQUEST_CANCELLED, principal.name, request))
        request, _ = await self._after(tx, request_id, None, None)
        return request

    async def extend(
        self, principal: Principal, grant_id: str, by: timedelta, reason: str, ticket: str = ""
    ) -> tuple[Grant, Request | None]:
        """Move the end of the caller's live grant `by` later, in place, within the rule's
        bounds. Where the rule asks for approval again, nothing moves yet: the answer is the
        grant as it is and a pending extension request (approving it extends the grant)."""
        with invalid_input():
            v.check_reason(reason)
            v.check_reason(ticket, field="ticket")
        if by < MIN_DURATION:
            raise InvalidArgument("an extension must be at least 1s")
        if by > MAX_DURATION:
            raise InvalidArgument("an extension must be at most 366d")
        # An action checks its own right (below); reads check visibility (domain/reads.py).
        grant = await self._load_grant(grant_id)
        if not same_person(principal.name, grant.subject):
            raise PermissionDenied("only the grant's subject may extend it")
        if grant.state not in EXTENDABLE_GRANT_STATES:
            raise Conflict(f"grant is {grant.state.value}; only a live grant can be extended")
        rule = await self._rule_now(principal, grant.agent, grant.action)
        problem = extension_problem(rule, grant, by)
        if problem:
            raise PermissionDenied(problem)
        if rule.extend.approval == "again":
            request, _ = await self.create_request(
                principal,
                agent=grant.agent,
                action=grant.action,
                duration=by,
                reason=reason,
                ticket=ticket,
                _extends=grant,
            )
            return grant, request
        return await self._extend_now(principal.name, grant, by, reason, rule), None

    async def _extend_now(
        self, actor: str, grant: Grant, by: timedelta, reason: str, rule: Rule
    ) -> Grant:
        now = self._clock.now()
        async with self._store.transaction() as tx:
            await refuse_if_locked(tx, grant.subject, grant.agent, grant.action, now)
            done = await extend_grant(
                tx, grant, by, now, actor=actor, reason=reason, rule=rule.name
            )
            if done is None:
                raise Conflict("grant changed meanwhile; try again")
        extended, command = done
        self._links.push([command])
        self._deadlines_changed()
        self._hub.requests_changed([grant.request_id])
        await self._hub.audit_written(tx.new_audit)
        return extended

    async def _rule_now(self, principal: Principal, agent: str, action: str) -> Rule:
        """The allow rule that decides for `principal` now (the current policy and groups)."""
        target = await self._store.get_agent(agent)
        if target is None:
            raise NotFound(f"agent {agent} is not enrolled")
        found = match(self._policy(), principal, action, agent, target.labels)
        if found.rule is None:
            raise PolicyDenied(f"{principal.name} may not {action} on {agent}: {found.explanation}")
        return found.rule

    async def revoke(self, principal: Principal, grant_id: str, reason: str) -> Grant:
        with invalid_input():
            v.check_reason(reason)

        async def allowed(grant: Grant) -> bool:
            if principal.is_admin:
                return True
            request = await self._store.get_request(grant.request_id)
            return request is not None and bool(
                principal.groups.intersection(request.approver_groups)
            )

        return await self._end(
            principal, grant_id, "revoked", reason or "revoked", allowed, AuditKind.GRANT_REVOKING
        )

    async def release(self, principal: Principal, grant_id: str) -> Grant:
        async def allowed(grant: Grant) -> bool:
            return same_person(principal.name, grant.subject)

        return await self._end(
            principal, grant_id, "released", "released", allowed, AuditKind.GRANT_RELEASING
        )

    async def get_request(self, principal: Principal, request_id: str) -> Request:
        """The request, if the caller may see it (domain/reads.py); else not found."""
        request = await self.visible_request(principal, request_id)
        if request is None:
            raise NotFound(f"no such request {request_id} (or not one you may see)")
        return request

    async def visible_request(self, principal: Principal, request_id: str) -> Request | None:
        request = await self._store.get_request(self._id(request_id, "request"))
        if request is None or not (await self._view(principal)).sees_request(request):
            return None
        return self.shown(request)

    async def _view(self, principal: Principal) -> View:
        async def pending(token: str, limit: int) -> tuple[list[Request], str]:
            return await self._store.list_requests(
                states=[RequestState.PENDING], subject="", agent="", limit=limit, page_token=token
            )

        return await view_of(principal, self._readers, pending)

    async def list_requests(
        self,
        principal: Principal,
        *,
        states: Sequence[RequestState],
        subject: str,
        agent: str,
        page_size: int,
        page_token: str,
        reviewable: bool = False,
    ) -> tuple[list[Request], str]:
        """A page of requests the caller may see (domain/reads.py), newest first.
        `reviewable`: only those the caller may approve now (pending, at a stage that names the
        caller, not the caller's own). A page may hold fewer than `page_size` and still have a
        next page."""
        if reviewable:
            states = [RequestState.PENDING]
        view = await self._view(principal)
        now = self._clock.now()

        async def fetch(token: str, limit: int) -> tuple[list[Request], str]:
            return await self._store.list_requests(
                states=states,
                subject=user_name(subject),
                agent=agent,
                limit=limit,
                page_token=token,
            )

        async def visible(rows: Sequence[Request]) -> list[bool]:
            return [
                view.sees_request(r) and (not reviewable or self.may_approve(principal, r, now))
                for r in rows
            ]

        items, token = await visible_page(fetch, visible, self._page_size(page_size), page_token)
        return [self.shown(r) for r in items], token

    async def changes(
        self, principal: Principal, after_seq: int, wanted: frozenset[str] = frozenset()
    ) -> tuple[list[Request], int]:
        """Requests changed after the cursor `after_seq` (an audit seq), each in its current
        state with its `change_seq`, in the order of their latest change, and the new cursor.
        Only `wanted` ids when given. The audit log is the record of changes, so a watcher that
        resumes from its cursor misses nothing, however many changes it slept through."""
        out: list[Request] = []
        cursor = after_seq
        while True:
            page = await self._store.requests_changed_after(cursor, WATCH_PAGE)
            for request_id, seq in page:
                cursor = max(cursor, seq)
                if wanted and request_id not in wanted:
                    continue
                try:
                    request = await self.get_request(principal, request_id)
                except (NotFound, PermissionDenied):
                    continue  # not a request the caller may see
                out.append(replace(request, change_seq=seq))
            if len(page) < WATCH_PAGE:
                return out, cursor

    async def head(self) -> int:
        """The newest change number (audit seq): a cursor that resumes with live changes."""
        ((_, seq),) = await self._store.requests_changed_after(-1, 1)
        return seq

    def may_approve(self, principal: Principal, request: Request, now: datetime) -> bool:
        """Whether `principal` could approve `request` at `now` (the rules of apply_review)."""
        if request.state is not RequestState.PENDING:
            return False
        plan, outcome = self.outcome(request, now)
        if any(same_person(r.reviewer, principal.name) for r in request.reviews):
            return False
        return not review_refusal(
            plan, outcome, principal, ReviewDecision.APPROVE, now, requester=request.subject
        )

    def shown(self, request: Request) -> Request:
        """The request as callers see it: the stage it waits at, and the stage each review
        counted for."""
        if request.state is not RequestState.PENDING and not request.reviews:
            return request
        plan = plan_of(request)
        outcome = self._apply(
            plan, request, request.reviews, request.decided_at or self._clock.now()
        )
        stage_of = {name: k for k, names in enumerate(outcome.counted) for name in names}
        return replace(
            request,
            current_stage=outcome.stage,
            reviews=tuple(
                replace(r, stage=stage_of.get(r.reviewer, outcome.stage)) for r in request.reviews
            ),
        )

    async def get_grant(self, principal: Principal, grant_id: str) -> Grant:
        """The grant, if the caller may see it (domain/reads.py); else not found."""
        grant = await self._load_grant(grant_id)
        view = await self._view(principal)
        if not (await self._grants_visible(view, [grant]))[0]:
            raise NotFound(f"no such grant {grant_id} (or not one you may see)")
        return grant

    async def _load_grant(self, grant_id: str) -> Grant:
        grant = await self._store.get_grant(self._id(grant_id, "grant"))
        if grant is None:
            raise NotFound(f"no such grant {grant_id}")
        return grant

    async def _grants_visible(self, view: View, grants: Sequence[Grant]) -> list[bool]:
        requests: dict[str, Request | None] = {}
        shown = []
        for grant in grants:
            if view.sees_grant(grant, None):
                shown.append(True)
                continue
            if grant.request_id not in requests:
                requests[grant.request_id] = await self._store.get_request(grant.request_id)
            shown.append(view.sees_grant(grant, requests[grant.request_id]))
        return shown

    async def list_grants(
        self,
        principal: Principal,
        *,
        states: Sequence[GrantState],
        subject: str,
        agent: str,
        page_size: int,
        page_token: str,
    ) -> tuple[list[Grant], str]:
        """Grants the caller may see (domain/reads.py), newest first, filtered."""
        view = await self._view(principal)

        async def fetch(token: str, limit: int) -> tuple[list[Grant], str]:
            return await self._store.list_grants(
                states=states,
                subject=user_name(subject),
                agent=agent,
                limit=limit,
                page_token=token,
            )

        async def visible(rows: Sequence[Grant]) -> list[bool]:
            return await self._grants_visible(view, rows)

        return await visible_page(fetch, visible, self._page_size(page_size), page_token)

    # Internals.

    async def _end(
        self,
        principal: Principal,
        grant_id: str,
        how: str,
        reason: str,
        allowed: Callable[[Grant], Awaitable[bool]],
        kind: AuditKind,
    ) -> Grant:
        grant = await self._load_grant(grant_id)
        if not await allowed(grant):
            raise PermissionDenied(_end_refusal(principal, grant, how))
        async with self._store.transaction() as tx:
            current = await tx.get_grant(grant.id)
            assert current is not None
            if current.state is GrantState.REVOKING:
                return current  # already on its way out: idempotent
            if how == "released" and current.state is GrantState.RELEASED:
                # Released already (`exec --release` ended it on the host and the agent said
                # so before the subject's own release arrived): idempotent too.
                return current
            if current.state not in ENDABLE_GRANT_STATES:
                raise Conflict(f"grant is {current.state.value}; nothing to {how[:-1]}")
            now = self._clock.now()
            ended, commands = await end_grants(
                tx,
                [current],
                now,
                by=principal.name,
                end_reason=reason if how == "revoked" else "released",
                kind=kind,
                revoke_reason=how,
                details={"reason": reason},
                expected=[current.state],
            )
            if not ended:
                raise Conflict("grant changed meanwhile; try again")
            updated = await tx.get_grant(current.id)
            assert updated is not None
        self._links.push(commands)
        self._hub.requests_changed([grant.request_id])
        await self._hub.audit_written(tx.new_audit)
        return updated

    async def _refused(self, subject: str, agent: str, action: str, why: str) -> None:
        async with self._store.transaction() as tx:
            await tx.audit(
                AuditEntry(
                    AuditKind.REQUEST_REFUSED,
                    subject,
                    self._clock.now(),
                    subject=subject,
                    agent=agent,
                    details={"action": action, "why": why},
                )
            )
        await self._hub.audit_written(tx.new_audit)

    async def _approve(
        self,
        tx: Tx,
        request: Request,
        rule: Rule,
        by: str,
        reason: str = "",
        *,
        now: datetime | None = None,
    ) -> tuple[Grant, Command]:
        now = now or self._clock.now()
        # Inside the approving transaction: a lock created a moment ago cannot be slipped past.
        # The agent (for the delivery gate) comes with the locks, in one trip.
        agents, locks = await tx.agents_and_locks([request.agent], now)
        lock = first_lock_at(locks, request.subject, request.agent, request.action, now)
        if lock is not None:
            raise lock_refusal(lock)
        if request.extends_grant_id:
            return await self._approve_extension(tx, request, rule, by, reason, now)
        if self._delivery is not None:
            # Refused before anything is written: the review is rolled back with it.
            target = agents.get(request.agent)
            if target is not None:
                undelivered = self._undelivered(
                    request.agent, target.last_seq, target.last_acked_seq
                )
                self._refuse_if_behind(request.agent, undelivered, request.duration)
        grant = self._new_grant(request, rule, now)
        await self._decide(tx, request, RequestState.APPROVED, by, reason, grant.id, at=now)
        seq = await tx.append_command(grant.agent, CommandKind.GRANT, grant.id, now)
        self._appended_seq(grant.agent, seq)
        stored = replace(grant, grant_seq=seq)
        (command,) = await write_grants(tx, [(request, stored, by)], now)
        return stored, command

    async def _approve_extension(
        self, tx: Tx, request: Request, rule: Rule, by: str, reason: str, now: datetime
    ) -> tuple[Grant, Command]:
        """An approved extension request moves its grant's end in place (no new grant)."""
        grant = await tx.get_grant(request.extends_grant_id)
        if grant is None or grant.state not in EXTENDABLE_GRANT_STATES:
            raise Conflict("the grant this request extends has ended")
        problem = extension_problem(rule, grant, request.duration)
        if problem:
            raise PermissionDenied(problem)
        await self._decide(tx, request, RequestState.APPROVED, by, reason, grant.id)
        done = await extend_grant(
            tx, grant, request.duration, now, actor=by, reason=reason, rule=rule.name
        )
        if done is None:
            raise Conflict("grant changed meanwhile; try again")
        await tx.audit(self._entry(AuditKind.REQUEST_APPROVED, by, request, grant_id=grant.id))
        return done

    def _scheduled_entry(self, by: str, request: Request) -> AuditEntry:
        start = rfc3339(request.start_at) if request.start_at else ""
        return self._entry(AuditKind.REQUEST_SCHEDULED, by, request, start_at=start)

    async def start_scheduled(self, now: datetime) -> int:
        """Issue the grants of SCHEDULED requests whose start has come, each after checking
        again that the policy still allows it for the subject's groups now and that no lock
        stands in the way; otherwise the request is DENIED, saying why. Returns how many were
        decided."""
        due = await self._store.due_scheduled(now, MAX_PAGE)
        for request in due:
            why, rule = await self._still_allowed(request, now)
            command: Command | None = None
            async with self._store.transaction() as tx:
                lock = await tx.lock_in_force(request.subject, request.agent, request.action, now)
                if not why and lock is not None:
                    why = lock_refusal(lock).message
                if why or rule is None:
                    by = f"policy:v{self._policy().version}" if lock is None else lock.id
                    await self._decide(
                        tx, request, RequestState.DENIED, by, why, expected=RequestState.SCHEDULED
                    )
                    await tx.audit(self._entry(AuditKind.REQUEST_DENIED, by, request, why=why))
                else:
                    grant = self._new_grant(request, rule, now)
                    await self._decide(
                        tx,
                        request,
                        RequestState.APPROVED,
                        "scheduler",
                        "started",
                        grant.id,
                        expected=RequestState.SCHEDULED,
                    )
                    # A scheduled start is not refused for delivery (it was accepted when asked
                    # for); its command counts towards the agent's bound like any other.
                    seq = await tx.append_command(grant.agent, CommandKind.GRANT, grant.id, now)
                    self._appended_seq(grant.agent, seq)
                    (command,) = await write_grants(
                        tx, [(request, replace(grant, grant_seq=seq), "scheduler")], now
                    )
            await self._after(tx, request.id, None, command)
        return len(due)

    async def _still_allowed(self, request: Request, now: datetime) -> tuple[str, Rule | None]:
        """Why the scheduled `request` may no longer start ('' and its rule when it may)."""
        assert request.start_at is not None
        if request.start_at + request.duration <= now:
            return "its time passed before it could start", None
        groups = await self._store.user_groups(request.subject) or frozenset()
        try:
            rule = await self._rule_now(
                Principal(request.subject, groups), request.agent, request.action
            )
        except (PermissionDenied, NotFound) as exc:
            return f"no longer allowed at its start: {exc.message}", None
        if request.duration > rule.max_duration:
            return f"rule {rule.name} now allows at most {format_duration(rule.max_duration)}", None
        return "", rule

    def _new_grant(self, request: Request, rule: Rule, now: datetime) -> Grant:
        """The grant an approval of `request` under `rule` creates, starting now (or at its
        scheduled start: its duration counts from there)."""
        start = request.start_at if request.start_at is not None and request.start_at < now else now
        return Grant(
            id=new_id("grt"),
            request_id=request.id,
            agent=request.agent,
            subject=request.subject,
            action=request.action,
            not_before=start,
            not_after=start + request.duration,
            state=GrantState.PENDING_DELIVERY,
            offline=rule.offline.to_policy(),
            created_at=now,
            epoch=self._epoch,
        )

    async def _decide(
        self,
        tx: Tx,
        request: Request,
        state: RequestState,
        by: str,
        reason: str,
        grant_id: str = "",
        *,
        expected: RequestState = RequestState.PENDING,
        at: datetime | None = None,
    ) -> None:
        ok = await tx.decide_request(
            request.id,
            expected=expected,
            state=state,
            at=at or self._clock.now(),
            by=by,
            reason=reason,
            grant_id=grant_id,
        )
        if not ok:
            raise Conflict("request was decided meanwhile")

    async def _after(
        self,
        tx: Tx,
        request_id: str,
        grant: Grant | None,
        command: Command | None,
        built: Request | None = None,
    ) -> tuple[Request, Grant | None]:
        """After a commit: push, wake, publish; the request as stored (`built`: as the caller
        built it, equal to what a read would return)."""
        if command is not None:
            self._step(Step.AFTER_COMMIT)
            self._links.push([command])
        self._deadlines_changed()
        self._hub.requests_changed([request_id])
        await self._hub.audit_written(tx.new_audit)
        request = built or await self._store.get_request(request_id)
        assert request is not None
        return self.shown(request), grant

    async def _get_request(self, tx: Tx, request_id: str) -> Request:
        request = await tx.get_request(self._id(request_id, "request"))
        if request is None:
            raise NotFound("no such request")
        return request

    def _rule(self, name: str) -> Rule:
        for rule in self._policy().model.rules:
            if rule.name == name and rule.effect == "allow":
                return rule
        raise Conflict(f"rule {name} is no longer in the policy; the request cannot be approved")

    @staticmethod
    def _id(value: str, what: str) -> str:
        with invalid_input():
            return v.check_id(value, what)

    @staticmethod
    def _page_size(size: int) -> int:
        return MAX_PAGE if size <= 0 else min(size, MAX_PAGE)

    def _entry(self, kind: AuditKind, actor: str, request: Request, **details: str) -> AuditEntry:
        grant_id = details.pop("grant_id", "")
        info = {"action": request.action, "duration": format_duration(request.duration)}
        if request.reason:
            info["reason"] = request.reason
        info.update({k: val for k, val in details.items() if val})
        return AuditEntry(
            kind,
            actor,
            self._clock.now(),
            subject=request.subject,
            agent=request.agent,
            request_id=request.id,
            grant_id=grant_id,
            details=info,
        )


def _still_pending(request: Request, now: datetime) -> None:
    """A decision on a request checks its pending deadline itself: between the deadline and the
    next expiry sweep the request is as good as EXPIRED (the sweep records it)."""
    if request.state is not RequestState.PENDING:
        raise Conflict(f"request is {request.state.value}, not PENDING")
    if request.pending_expires_at is not None and now >= request.pending_expires_at:
        raise Conflict("request expired unreviewed (its pending time is over): ask again")


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == want for k, want in selector.items())


def _labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={val}" for k, val in sorted(labels.items()))
