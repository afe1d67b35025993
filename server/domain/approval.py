"""Approval decisions, pure: given a request's pinned plan, its reviews and the time, what is
its state? (Teleport's `ApplyAccessReview` is the model: one function, every rule in it.)

Rules, all judged here and nowhere else:

- Stages run in order. Stage k opens when stage k-1 passed (stage 0 when the request was
  created). An approval counts for the open stage only, and each person counts once per
  request, so the people of two stages are always different people.
- A stage passes with `approvals` distinct eligible approvers (`any`), or with `all` at least
  one approver from each of its groups and `approvals` in total. After the stage's `timeout`
  the `escalate_to` groups are eligible too, and under `all` an escalation approver stands in
  for any group not yet covered.
- Eligibility is judged at the moment of reviewing, from the groups the reviewer was in then
  (recorded on the review): a reviewer who leaves a group later still counted; one who joins
  later did not.
- Nobody reviews their own request, under any spelling of their name, nor relays a review of
  it in someone else's name (a review whose delegate is the requester does not count).
- A deny from anyone eligible for the open stage or a later one ends the request (deny wins);
  a deny from anyone else is ignored.
- Approvals outside the plan's approve windows do not count.
- The pending deadline bounds the whole approval: reviews at or after it are ignored, and a
  request not approved by then is EXPIRED.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, NamedTuple

from jitmesh.durations import format_duration
from jitmesh.types import (
    ApprovalPlan,
    ApprovalStage,
    Request,
    RequestState,
    Review,
    ReviewDecision,
    StageMode,
)

from .models import Principal, same_person, user_name
from .policy import Auto
from .windows import in_windows, parse_window

DAY = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The state of a request under its plan. `stage`: the open stage's index (the number of
    stages once approved). `counted`: the approvers counted for each stage. `next_change_at`:
    when a pending request changes by time alone (an escalation or the deadline)."""

    state: RequestState
    stage: int
    counted: tuple[tuple[str, ...], ...]
    stage_opened_at: datetime
    decided_at: datetime | None = None
    decided_by: str = ""
    reason: str = ""
    next_change_at: datetime | None = None
    ignored: tuple[tuple[str, str], ...] = ()


def plan_groups(plan: ApprovalPlan) -> frozenset[str]:
    """Every group the plan names (approvers and escalation)."""
    return frozenset(g for s in plan.stages for g in (*s.groups, *s.escalation_groups))


def recorded_groups(plan: ApprovalPlan, principal: Principal) -> tuple[str, ...]:
    """What a review records: the plan's groups the reviewer is in now."""
    return tuple(sorted(principal.groups & plan_groups(plan)))


def escalated(stage: ApprovalStage, opened_at: datetime, at: datetime) -> bool:
    return stage.timeout is not None and at >= opened_at + stage.timeout


def eligible(
    stage: ApprovalStage, reviewer: str, groups: Iterable[str], *, escalation: bool
) -> bool:
    """Whether someone with `groups` may approve `stage` (with its escalation groups too)."""
    held = set(groups)
    return (
        any(same_person(u, reviewer) for u in stage.users)
        or bool(held.intersection(stage.groups))
        or (escalation and bool(held.intersection(stage.escalation_groups)))
    )


def stage_passed(stage: ApprovalStage, approvers: Sequence[Review], *, escalation: bool) -> bool:
    if len(approvers) < stage.approvals:
        return False
    if stage.mode is StageMode.ANY:
        return True
    covered = {g for r in approvers for g in r.groups if g in stage.groups}
    missing = len(set(stage.groups) - covered)
    if missing == 0:
        return True
    # After escalation, each approver from an escalation group (and no stage group) stands in
    # for one group not yet covered.
    standins = sum(
        1
        for r in approvers
        if escalation
        and set(r.groups).intersection(stage.escalation_groups)
        and not set(r.groups).intersection(stage.groups)
    )
    return standins >= missing


def apply_review(
    plan: ApprovalPlan,
    reviews: Sequence[Review],
    now: datetime,
    *,
    requester: str,
    opened_at: datetime,
    deadline: datetime,
) -> Outcome:
    """The state of a request created at `opened_at` by `requester`, pending until `deadline`,
    after `reviews` (in any order), at `now`."""
    stages = plan.stages
    counted: list[list[Review]] = [[] for _ in stages]
    ignored: list[tuple[str, str]] = []
    seen: set[str] = set()
    stage = 0
    stage_opened = opened_at

    def outcome(state: RequestState, **kw: object) -> Outcome:
        return Outcome(
            state=state,
            stage=stage,
            counted=tuple(tuple(r.reviewer for r in c) for c in counted),
            stage_opened_at=stage_opened,
            ignored=tuple(ignored),
            **kw,  # type: ignore[arg-type]
        )

    if not stages:
        # Nothing to wait for (automatic approval is decided at creation, not here).
        return outcome(RequestState.APPROVED, decided_at=opened_at, decided_by="policy")
    windows = [parse_window(w) for w in plan.approve_windows]
    for review in sorted(reviews, key=lambda r: r.reviewed_at):
        at, who = review.reviewed_at, review.reviewer
        if at > now:
            ignored.append((who, "in the future"))
            continue
        if at >= deadline:
            ignored.append((who, "after the deadline"))
            continue
        if at < opened_at:
            ignored.append((who, "before the request"))
            continue
        if _by_requester(who, review.via, requester):
            ignored.append((who, "own request"))
            continue
        key = user_name(who)
        if key in seen:
            ignored.append((who, "reviewed already"))
            continue
        current = stages[stage]
        late = escalated(current, stage_opened, at)
        if review.decision is ReviewDecision.DENY:
            may_deny = eligible(current, who, review.groups, escalation=late) or any(
                eligible(s, who, review.groups, escalation=False) for s in stages[stage + 1 :]
            )
            if may_deny:
                return outcome(
                    RequestState.DENIED, decided_at=at, decided_by=who, reason=review.reason
                )
            ignored.append((who, "not an approver of this request"))
            continue
        if not in_windows(windows, at):
            ignored.append((who, "outside the approval windows"))
            continue
        if not eligible(current, who, review.groups, escalation=late):
            ignored.append((who, f"not an approver of stage {current.name}"))
            continue
        seen.add(key)
        counted[stage].append(review)
        if stage_passed(current, counted[stage], escalation=late):
            stage += 1
            stage_opened = at
            if stage == len(stages):
                return outcome(
                    RequestState.APPROVED, decided_at=at, decided_by=who, reason=review.reason
                )
    if now >= deadline:
        return outcome(
            RequestState.EXPIRED,
            decided_at=deadline,
            decided_by="coordinator",
            reason="not reviewed in time",
        )
    current = stages[stage]
    change = deadline
    if current.timeout is not None and not escalated(current, stage_opened, now):
        change = min(change, stage_opened + current.timeout)
    return outcome(RequestState.PENDING, next_change_at=change)


SELF_REVIEW: Final = "nobody may review their own request"


def _by_requester(reviewer: str, via: str, requester: str) -> bool:
    """The requester acting on their own request: in person, or as the delegate relaying
    someone else's review of it (self-approval under another name)."""
    return same_person(reviewer, requester) or (bool(via) and same_person(via, requester))


def review_refusal(
    plan: ApprovalPlan,
    outcome: Outcome,
    principal: Principal,
    decision: ReviewDecision,
    now: datetime,
    *,
    requester: str,
) -> str:
    """Why `principal` may not review now (empty when they may): the same rules as
    `apply_review`, asked before a review is stored so that nobody's review is silently
    ignored."""
    if _by_requester(principal.name, principal.via, requester):
        return SELF_REVIEW
    if outcome.state is not RequestState.PENDING:
        return f"request is {outcome.state.value}, not PENDING"
    stages = plan.stages
    current = stages[outcome.stage]
    late = escalated(current, outcome.stage_opened_at, now)
    groups = principal.groups
    if eligible(current, principal.name, groups, escalation=late):
        if decision is ReviewDecision.APPROVE and not in_windows(
            [parse_window(w) for w in plan.approve_windows], now
        ):
            return "approvals are accepted only " + "; ".join(plan.approve_windows)
        return ""
    later = [
        s
        for s in stages[outcome.stage + 1 :]
        if eligible(s, principal.name, groups, escalation=False)
    ]
    if later and decision is ReviewDecision.DENY:
        return ""
    if later:
        return f"you approve at stage {later[0].name}, which has not started yet"
    names = [*(f"group {g}" for g in current.groups), *(f"user {u}" for u in current.users)]
    if late:
        names.extend(f"group {g}" for g in current.escalation_groups)
    return f"stage {current.name} needs approval from " + ", ".join(names)


class Usage(NamedTuple):
    """Automatic grants in the window: how many, and how much time they grant."""

    grants: int
    granted: timedelta


def budget_usage(
    grants: Iterable[tuple[datetime, datetime, datetime | None]], now: datetime
) -> Usage:
    """Automatic grants made in the last 24 hours, each as (not_before, not_after, ended_at):
    how many, and how much time they grant (a grant's time counts until it ended early)."""
    count = 0
    granted = timedelta(0)
    for not_before, not_after, ended_at in grants:
        count += 1
        end = not_after if ended_at is None else min(ended_at, not_after)
        granted += max(end - not_before, timedelta(0))
    return Usage(count, granted)


def within_budget(
    count: int | None, granted: timedelta | None, usage: Usage, duration: timedelta
) -> tuple[bool, str]:
    """Whether one more automatic grant of `duration` fits, and a line explaining it."""
    parts = []
    ok = True
    if count is not None:
        parts.append(f"{usage.grants} of {count} automatic grants")
        ok = ok and usage.grants + 1 <= count
    if granted is not None:
        used = _short(usage.granted)
        parts.append(f"{used} of {_short(granted)} granted time")
        ok = ok and usage.granted + duration <= granted
    text = "budget: " + ", ".join(parts) + " used in the last 24h"
    return ok, text + ("" if ok else "; this request would exceed it and waits for a person")


def auto_decision(
    auto: Auto | None, usage: Usage, duration: timedelta, now: datetime
) -> tuple[bool, tuple[str, ...]]:
    """Whether the policy approves by itself now, with one line per limit judged."""
    if auto is None:
        return False, ()
    notes: list[str] = []
    ok = True
    if auto.windows:
        inside = in_windows([parse_window(w) for w in auto.windows], now)
        notes.append(
            "auto-approval window "
            + "; ".join(auto.windows)
            + (": open now" if inside else ": closed now, the request waits for a person")
        )
        ok = inside
    if auto.budget is not None:
        fits, line = within_budget(auto.budget.count, auto.budget.granted, usage, duration)
        notes.append(line)
        ok = ok and fits
    return ok, tuple(notes)


def _short(d: timedelta) -> str:
    return format_duration(d) if d > timedelta(0) else "0s"


def plan_json(plan: ApprovalPlan | None) -> str:
    """The stored form of a plan (JSON, keys in a fixed order); '' for none."""
    if plan is None:
        return ""
    return json.dumps(
        {
            "policy_version": plan.policy_version,
            "rule": plan.rule,
            "approve_windows": list(plan.approve_windows),
            "pending_ttl_ms": None
            if plan.pending_ttl is None
            else plan.pending_ttl // timedelta(milliseconds=1),
            "reason_required": plan.reason_required,
            "ticket_pattern": plan.ticket_pattern,
            "automatic": plan.automatic,
            "stages": [
                {
                    "name": s.name,
                    "approvals": s.approvals,
                    "mode": s.mode.value,
                    "groups": list(s.groups),
                    "users": list(s.users),
                    "timeout_ms": None
                    if s.timeout is None
                    else s.timeout // timedelta(milliseconds=1),
                    "escalate_to": list(s.escalation_groups),
                }
                for s in plan.stages
            ],
        },
        separators=(",", ":"),
    )


def plan_from_json(text: str) -> ApprovalPlan | None:
    """A stored plan ('' for a request stored before plans: see `plan_of`)."""
    if not text:
        return None
    data = json.loads(text)
    return ApprovalPlan(
        policy_version=int(data["policy_version"]),
        rule=str(data["rule"]),
        approve_windows=tuple(data.get("approve_windows", ())),
        pending_ttl=None
        if data.get("pending_ttl_ms") is None
        else timedelta(milliseconds=data["pending_ttl_ms"]),
        reason_required=bool(data.get("reason_required", False)),
        ticket_pattern=str(data.get("ticket_pattern", "")),
        automatic=bool(data.get("automatic", False)),
        stages=tuple(
            ApprovalStage(
                name=s["name"],
                approvals=int(s["approvals"]),
                mode=StageMode(s["mode"]),
                groups=tuple(s["groups"]),
                users=tuple(s["users"]),
                timeout=None
                if s["timeout_ms"] is None
                else timedelta(milliseconds=s["timeout_ms"]),
                escalation_groups=tuple(s["escalate_to"]),
            )
            for s in data["stages"]
        ),
    )


def plan_of(request: Request) -> ApprovalPlan:
    """The request's pinned plan; a request stored before plans existed gets the one stage it
    was made with (its approvals and groups), under policy version 0."""
    if request.plan is not None:
        return request.plan
    stages: tuple[ApprovalStage, ...] = ()
    if request.approvals_required:
        stages = (
            ApprovalStage(
                "stage-1", request.approvals_required, groups=tuple(request.approver_groups)
            ),
        )
    return ApprovalPlan(0, request.rule, stages)
