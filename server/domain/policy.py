"""The access policy: a YAML document of rules, validated with pydantic, evaluated purely.

A request matches a rule when the subject (by name or group), the action and the agent (by name or
labels) all match. Deny rules win wherever they match; otherwise the first allow rule in document
order decides; nothing matching means deny. The rule then bounds the duration, may require a
reason, and says how the request is approved: automatically, or by N people from named groups.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import re
import typing
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from jitmesh import validation as v
from jitmesh.durations import DurationError, format_duration, parse_duration
from jitmesh.types import (
    ApprovalPlan,
    ApprovalStage,
    OfflineMode,
    OfflinePolicy,
    PolicyDecision,
    StageMode,
)

from .errors import InvalidArgument
from .models import Principal, same_person, user_name
from .windows import WindowError, parse_window

MAX_POLICY_BYTES = 256 * 1024
ANY = "*"


def _duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("expected a duration such as 15m or 1h")
    if isinstance(value, int):
        value = f"{value}s"
    try:
        return parse_duration(value)
    except DurationError as exc:
        raise ValueError(str(exc)) from None


Duration = Annotated[timedelta, BeforeValidator(_duration)]


def _names(pattern: Any, what: str) -> Any:
    def check(values: list[str]) -> list[str]:
        for value in values:
            if value != ANY and not pattern.fullmatch(value):
                raise ValueError(f"{what} {value!r} is not a valid name")
        return values

    return check


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SubjectMatch(_Strict):
    users: list[str] = []
    groups: list[str] = []

    _users = field_validator("users")(_names(v.SUBJECT, "user"))
    _groups = field_validator("groups")(_names(v.GROUP, "group"))

    @model_validator(mode="after")
    def _not_empty(self) -> SubjectMatch:
        if not self.users and not self.groups:
            raise ValueError("name at least one user or group")
        return self


class AgentMatch(_Strict):
    names: list[str] = []
    labels: dict[str, str] = {}

    _names_ok = field_validator("names")(_names(v.AGENT, "agent"))

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        try:
            return v.check_labels(labels)
        except v.ValidationError as exc:
            raise ValueError(str(exc)) from None


class Stage(_Strict):
    """One approval stage: `approvals` distinct people from its groups and users (`any`), or
    with `all` at least one from each listed group and `approvals` in total. After `timeout`
    without passing, members of `escalate_to` may approve it too."""

    name: str = ""
    approvals: int = Field(default=1, ge=1, le=10)
    mode: Literal["any", "all"] = "any"
    groups: list[str] = []
    users: list[str] = []
    timeout: Duration | None = None
    escalate_to: list[str] = []

    _groups = field_validator("groups", "escalate_to")(_names(v.GROUP, "group"))
    _users = field_validator("users")(_names(v.SUBJECT, "user"))

    @model_validator(mode="after")
    def _consistent(self) -> Stage:
        if not self.groups and not self.users:
            raise ValueError("a stage names at least one approver group or user")
        if ANY in self.groups or ANY in self.users:
            raise ValueError("approvers are named; '*' cannot approve")
        if self.mode == "all" and not self.groups:
            raise ValueError("mode all needs groups (one approver from each)")
        if (self.timeout is None) != (not self.escalate_to):
            raise ValueError("timeout and escalate_to go together (escalate to whom, when)")
        if self.timeout is not None and self.timeout < timedelta(seconds=1):
            raise ValueError("timeout must be at least 1s")
        return self

    def to_stage(self, index: int) -> ApprovalStage:
        return ApprovalStage(
            name=self.name or f"stage-{index + 1}",
            approvals=self.approvals,
            mode=StageMode(self.mode),
            groups=tuple(self.groups),
            users=tuple(user_name(u) for u in self.users),
            timeout=self.timeout,
            escalation_groups=tuple(self.escalate_to),
        )


def _windows(values: list[str]) -> list[str]:
    for value in values:
        try:
            parse_window(value)
        except WindowError as exc:
            raise ValueError(str(exc)) from None
    return values


class Budget(_Strict):
    """Automatic approvals per user and rule over a rolling 24 hours: at most `count` grants
    and at most `granted` time (a grant's time counts until it is released or expires)."""

    count: int | None = Field(default=None, ge=1, le=100_000)
    granted: Duration | None = None

    @model_validator(mode="after")
    def _something(self) -> Budget:
        if self.count is None and self.granted is None:
            raise ValueError("a budget names count, granted, or both")
        return self


class Auto(_Strict):
    """When the policy approves by itself: inside `windows` (all times when empty) and within
    `budget` (no limit when absent). Outside them the request waits for the stages."""

    windows: list[str] = []
    budget: Budget | None = None

    _windows_ok = field_validator("windows")(_windows)

    @property
    def limited(self) -> bool:
        return bool(self.windows) or self.budget is not None


class Approval(_Strict):
    """`approval: auto`; `approval: {approvals: N, from_groups: [...]}` (version 1); or
    `approval: {auto: {...}, stages: [...], approve_windows: [...]}`."""

    auto: Auto | None = None
    stages: list[Stage] = []
    # When people may approve; empty means at any time.
    approve_windows: list[str] = []

    _windows_ok = field_validator("approve_windows")(_windows)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if data == "auto":
            return {"auto": {}}
        if not isinstance(data, dict):
            return data
        data = dict(data)
        mode = data.pop("mode", None)
        if mode == "auto":
            data.setdefault("auto", {})
        if "approvals" in data or "from_groups" in data or mode == "manual":
            if "stages" in data:
                raise ValueError("use either stages or approvals/from_groups, not both")
            groups = data.pop("from_groups", [])
            if not groups:
                raise ValueError("manual approval needs from_groups")
            data["stages"] = [{"approvals": data.pop("approvals", 1), "groups": groups}]
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Approval:
        if self.auto is None and not self.stages:
            raise ValueError("approval needs stages, or auto")
        if self.auto is not None and self.auto.limited and not self.stages:
            raise ValueError(
                "auto-approval with windows or a budget needs stages: past them the request "
                "waits for a person"
            )
        if self.auto is not None and not self.auto.limited and self.stages:
            raise ValueError("unlimited auto-approval makes the stages unreachable")
        return self

    @property
    def always_auto(self) -> bool:
        return self.auto is not None and not self.auto.limited


class Extension(_Strict):
    """How a live grant may be extended in place: at most `max_count` times, never past
    `max_total` from its start (the rule's max_duration when absent); `approval: again` asks
    the rule's stages once more instead of extending at once."""

    max_count: int = Field(default=3, ge=0, le=100)
    max_total: Duration | None = None
    approval: Literal["auto", "again"] = "auto"


class Offline(_Strict):
    mode: Literal["hold", "revoke_after"] = "hold"
    grace: Duration | None = None

    @model_validator(mode="after")
    def _grace(self) -> Offline:
        if self.mode == "revoke_after" and self.grace is None:
            raise ValueError("revoke_after needs a grace duration")
        return self

    def to_policy(self) -> OfflinePolicy:
        if self.mode == "hold":
            return OfflinePolicy(OfflineMode.HOLD, timedelta(0))
        return OfflinePolicy(OfflineMode.REVOKE_AFTER, self.grace or timedelta(0))


class Rule(_Strict):
    name: str
    effect: Literal["allow", "deny"] = "allow"
    subjects: SubjectMatch
    actions: list[str] = Field(min_length=1)
    agents: AgentMatch
    max_duration: Duration = timedelta(hours=1)
    reason: Literal["optional", "required"] = "optional"
    # A pattern the ticket id must match in full (the ticket is then required).
    ticket: str | None = Field(default=None, max_length=256)
    # How long a request waits for approval (the policy's request_ttl when absent).
    pending_ttl: Duration | None = None
    approval: Approval = Approval(auto=Auto())
    offline: Offline = Offline()
    extend: Extension = Extension()

    _rule_name = field_validator("name")(lambda value: v.check(v.RULE, value, "rule name"))
    _actions = field_validator("actions")(_names(v.ACTION, "action"))

    @field_validator("ticket")
    @classmethod
    def _ticket(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error:
                raise ValueError("ticket is not a valid regular expression") from None
        return value

    @field_validator("pending_ttl")
    @classmethod
    def _pending(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and not timedelta(seconds=1) <= value <= timedelta(days=30):
            raise ValueError("pending_ttl must be between 1s and 30d")
        return value

    def ticket_ok(self, ticket: str) -> bool:
        return self.ticket is None or re.fullmatch(self.ticket, ticket) is not None

    def matches_subject(self, principal: Principal) -> bool:
        users = self.subjects.users
        return (
            ANY in users
            or any(same_person(u, principal.name) for u in users)
            or ANY in self.subjects.groups
            or bool(principal.groups.intersection(self.subjects.groups))
        )

    def matches_action(self, action: str) -> bool:
        return ANY in self.actions or action in self.actions

    def matches_agent(self, name: str, labels: dict[str, str]) -> bool:
        match = self.agents
        if match.names and name not in match.names and ANY not in match.names:
            return False
        return all(labels.get(k) == want for k, want in match.labels.items())


# Coordinator roles and their spellings: never an action, so no grant can confer them.
RESERVED_ACTIONS = frozenset({"admin", "admins", "approve", "approver", "approvers", "coordinator"})


def reserved_action(action: str) -> bool:
    folded = action.replace("_", "-").replace(".", "-")
    return folded in RESERVED_ACTIONS or folded.startswith(("jitmesh", "admin-", "approver-"))


class PolicyModel(_Strict):
    # Version 2 added stages, auto-approval limits, tickets, pending_ttl and extend; every
    # version-1 document means the same under version 2.
    version: Literal[1, 2] = 1
    # The catalogue of actions agents know; a request for any other action is refused.
    actions: list[str] = Field(min_length=1)
    request_ttl: Duration = timedelta(hours=1)
    rules: list[Rule] = []

    _actions = field_validator("actions")(_names(v.ACTION, "action"))

    @model_validator(mode="after")
    def _consistent(self) -> PolicyModel:
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.name in seen:
                raise ValueError(f"rules[{i}]: rule name {rule.name!r} is used twice")
            seen.add(rule.name)
            for action in rule.actions:
                if action != ANY and action not in self.actions:
                    raise ValueError(
                        f"rules[{i}] ({rule.name}): action {action!r} is not in the actions list"
                    )
        if ANY in self.actions:
            raise ValueError("actions: list the actions by name ('*' is for rules)")
        for action in self.actions:
            if reserved_action(action):
                # Actions are what agents enforce on hosts. One named like a coordinator role
                # would invite a hook that maps it to approver or admin rights: a request path
                # to raising one's own privileges (Teleport GHSA-76cc-p55w-63g3).
                raise ValueError(f"actions: {action!r} names a coordinator role and is reserved")
        return self


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated policy with the text it came from."""

    model: PolicyModel
    text: str
    # The stored version (0 until stored).
    version: int = 0

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Match:
    """The outcome of matching: the deciding rule (None when denied) and a trace."""

    rule: Rule | None
    explanation: str
    trace: tuple[str, ...]


def parse_policy(text: str) -> Policy:
    """Parse and validate a policy document; errors name the place (line, or path of the field)."""
    if len(text.encode()) > MAX_POLICY_BYTES:
        raise InvalidArgument(f"policy is larger than {MAX_POLICY_BYTES // 1024} KiB")
    yaml = YAML(typ="safe", pure=True)
    yaml.version = (1, 2)
    try:
        data = yaml.load(io.StringIO(text))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise InvalidArgument(f"policy is not valid YAML at {where}: {exc.problem}") from None
    except YAMLError:
        raise InvalidArgument("policy is not valid YAML") from None
    if not isinstance(data, dict):
        raise InvalidArgument("policy must be a YAML mapping with actions and rules")
    try:
        model = PolicyModel.model_validate(data)
    except ValidationError as exc:
        raise InvalidArgument(f"policy is invalid: {_first_error(exc)}") from None
    return Policy(model=model, text=text)


def _first_error(exc: ValidationError) -> str:
    found = exc.errors(include_url=False, include_input=False)
    # An unknown key first: a misspelt key (`subject`) also makes the right one (`subjects`)
    # missing, and the misspelling is what to fix.
    for err in found:
        loc = err["loc"]
        if err["type"] == "extra_forbidden" and loc and isinstance(loc[-1], str):
            return _unknown_key(loc)
    err = found[0]
    return f"{_place(err['loc'])}: {err['msg'].removeprefix('Value error, ')}"


def _place(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif "function-" not in item:  # pydantic's own validator tags are not places
            parts.append(f".{item}" if parts else item)
    return "".join(parts) or "document"


def _unknown_key(loc: tuple[int | str, ...]) -> str:
    """`rules[0]: unknown key 'subject' (did you mean 'subjects'?)`, naming the keys allowed
    there. The key is the document's own text: shown only when it has the shape of a key."""
    *parent, key = loc
    allowed = _keys_at(tuple(parent))
    where = _place(tuple(parent))
    if not isinstance(key, str) or not _KEY_SHAPE.fullmatch(key):
        return f"{where}: unknown key (allowed: {', '.join(allowed)})"
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})"
    return f"{where}: unknown key {key!r}{hint}"


_KEY_SHAPE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    """The keys the model at `loc` (a path into PolicyModel) allows."""
    model: type[BaseModel] = PolicyModel
    for item in loc:
        if isinstance(item, int):
            continue
        field = model.model_fields.get(item)
        inner = _model_in(field.annotation) if field is not None else None
        if inner is None:
            break
        model = inner
    return sorted(f.alias or name for name, f in model.model_fields.items())


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def unknown_action(action: str, policy: Policy) -> str:
    """The refusal of an action the policy's catalogue does not list, listing the ones it does."""
    known = policy.model.actions
    close = difflib.get_close_matches(action, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown action {action}: {hint}the policy's actions are {', '.join(known)}"


def match(
    policy: Policy,
    principal: Principal,
    action: str,
    agent: str,
    labels: dict[str, str],
) -> Match:
    """Which rule decides, and why. Pure: the same inputs always give the same answer."""
    model = policy.model
    if action not in model.actions:
        return Match(None, f"action {action!r} is not in the policy's actions", ())
    trace: list[str] = []
    chosen: Rule | None = None
    for rule in model.rules:
        misses = []
        if not rule.matches_subject(principal):
            misses.append("subject")
        if not rule.matches_action(action):
            misses.append("action")
        if not rule.matches_agent(agent, labels):
            misses.append("agent")
        if misses:
            trace.append(f"{rule.name} ({rule.effect}): no match on {', '.join(misses)}")
            continue
        trace.append(f"{rule.name} ({rule.effect}): matches")
        if rule.effect == "deny":
            return Match(None, f"denied by rule {rule.name}", tuple(trace))
        if chosen is None:
            chosen = rule
    if chosen is None:
        return Match(None, "no rule allows this (default deny)", tuple(trace))
    return Match(chosen, f"allowed by rule {chosen.name}", tuple(trace))


def plan_for(policy: Policy, rule: Rule) -> ApprovalPlan:
    """The approval plan a request under `rule` pins at creation."""
    approval = rule.approval
    return ApprovalPlan(
        policy_version=policy.version,
        rule=rule.name,
        stages=tuple(stage.to_stage(i) for i, stage in enumerate(approval.stages)),
        approve_windows=tuple(approval.approve_windows),
        pending_ttl=pending_ttl(policy, rule),
        reason_required=rule.reason == "required",
        ticket_pattern=rule.ticket or "",
    )


def pending_ttl(policy: Policy, rule: Rule) -> timedelta:
    return rule.pending_ttl or policy.model.request_ttl


def describe_stage(stage: ApprovalStage) -> str:
    who = ", ".join([*(f"group {g}" for g in stage.groups), *(f"user {u}" for u in stage.users)])
    how = "one from each group, " if stage.mode is StageMode.ALL else ""
    text = f"stage {stage.name}: {how}{stage.approvals} approval(s) from {who}"
    if stage.timeout is not None:
        text += f"; after {format_duration(stage.timeout)} also from " + ", ".join(
            f"group {g}" for g in stage.escalation_groups
        )
    return text


def decision(
    found: Match,
    duration: timedelta | None = None,
    notes: tuple[str, ...] = (),
    plan: ApprovalPlan | None = None,
) -> PolicyDecision:
    """The answer of `policy test`. `notes`: what else was judged (auto-approval windows and
    budget), one line each, appended to the trace."""
    rule = found.rule
    if rule is None:
        return PolicyDecision(False, "", found.explanation, False, 0, (), None, False, found.trace)
    explanation = found.explanation
    allowed = True
    if duration is not None and duration > rule.max_duration:
        allowed = False
        explanation = (
            f"rule {rule.name} matches, but its maximum duration is "
            f"{format_duration(rule.max_duration)}"
        )
    stages = [s.to_stage(i) for i, s in enumerate(rule.approval.stages)]
    manual = not rule.approval.always_auto
    if plan is not None and plan.automatic:
        manual = False
    lines = list(found.trace)
    if rule.approval.auto is not None:
        lines.append("approval: automatic" + (" within its limits" if manual else ""))
    lines.extend(f"approval: {describe_stage(s)}" for s in stages)
    if rule.approval.approve_windows:
        lines.append("approval: people may approve " + "; ".join(rule.approval.approve_windows))
    if rule.ticket is not None:
        lines.append(f"ticket: required, matching {rule.ticket}")
    lines.extend(notes)
    return PolicyDecision(
        allowed=allowed,
        rule=rule.name,
        explanation=explanation,
        approval_required=manual,
        approvals_required=sum(s.approvals for s in stages) if manual else 0,
        approver_groups=tuple(dict.fromkeys(g for s in stages for g in s.groups)) if manual else (),
        max_duration=rule.max_duration,
        reason_required=rule.reason == "required",
        trace=tuple(lines),
        plan=plan,
        policy_version=plan.policy_version if plan is not None else 0,
    )


DEV_POLICY = """\
# jitmesh development policy. Anything not allowed here is denied.
version: 1
actions: [deploy, restart, logs, shell, db-migrate]
request_ttl: 1h
rules:
  - name: staging-self-service
    subjects: {groups: [developers]}
    actions: [deploy, restart, logs]
    agents: {labels: {env: staging}}
    max_duration: 1h
    reason: optional
    approval: auto
  - name: prod-with-approval
    subjects: {groups: [developers]}
    actions: [deploy, restart, logs]
    agents: {labels: {env: prod}}
    max_duration: 1h
    reason: required
    approval: {approvals: 1, from_groups: [sre]}
  - name: sre-prod
    subjects: {groups: [sre]}
    actions: ["*"]
    agents: {labels: {env: prod}}
    max_duration: 4h
    reason: required
    approval: {approvals: 1, from_groups: [sre]}
"""

# A coordinator started without a policy denies everything until one is applied.
EMPTY_POLICY = """\
version: 1
actions: [deploy, restart, logs]
rules: []
"""
