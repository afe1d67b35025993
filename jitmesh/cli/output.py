"""How jitctl shows things: JSON or YAML objects for programs, aligned tables for people.

JSON and YAML: every object carries `id` and `state`; instants are RFC 3339 UTC strings with
exactly three fraction digits, ending in Z (or null when unset); durations appear twice, as
"15m" and in seconds. Tables: a header row, aligned columns, UTC times with a relative hint
("in 12m"), states coloured on a terminal, and nothing from the coordinator that could steer a
terminal (control characters are replaced).

Tables are laid out here rather than by `rich.table.Table`: rich fits a table into the
terminal's width by wrapping or cutting cells, which breaks copying an id and `grep`; we never
cut a cell and let a long line run on, like kubectl. rich measures cell widths (wide characters)
and colours the states.

Pure functions of their arguments (the current time included), so they are tested directly.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from rich.cells import cell_len
from rich.text import Text
from ruamel.yaml import YAML

from jitmesh import clock
from jitmesh.durations import format_duration
from jitmesh.types import (
    Agent,
    ApprovalStage,
    AuditEvent,
    BreakglassCode,
    ChainVerification,
    Grant,
    GrantState,
    JoinToken,
    JoinTokenInfo,
    Lock,
    MeshStatus,
    PolicyDecision,
    PolicyDocument,
    Request,
    RequestOption,
    Review,
    TokenInfo,
    UserInfo,
)

JSON = dict[str, Any]

_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NONE: Final = "-"


# ---------------------------------------------------------------------------------------------
# Scalars


def rfc3339(at: datetime | None) -> str | None:
    """2026-01-01T12:00:00.000Z (jitmesh.clock.rfc3339), or None when unset."""
    return None if at is None else clock.rfc3339(at)


def seconds(value: timedelta) -> int | float:
    total = value.total_seconds()
    return int(total) if total == int(total) else total


def human_time(at: datetime | None) -> str:
    if at is None:
        return _NONE
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def relative(at: datetime, now: datetime) -> str:
    """ "in 14m30s" or "3h5m ago": the two most significant units are enough for people."""
    delta = at - now
    ago = delta < timedelta(0)
    whole = timedelta(seconds=round(abs(delta.total_seconds())))
    if whole == timedelta(0):
        return "now"
    text = _two_units(whole)
    return f"{text} ago" if ago else f"in {text}"


def _two_units(value: timedelta) -> str:
    parts = re.findall(r"\d+[a-z]+", format_duration(value))
    return "".join(parts[:2])


def duration_text(value: timedelta | None) -> str:
    return _NONE if value is None else format_duration(value)


def cell(value: object) -> str:
    """One table cell: one line, no control characters, "-" for nothing."""
    text = " ".join(str(value).split())
    return _CONTROL.sub("?", text) if text else _NONE


def dumps(value: JSON | list[JSON]) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def dumps_line(value: JSON) -> str:
    """One object per line, for streams (JSON Lines)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def dumps_yaml(value: JSON | list[JSON]) -> str:
    """The JSON value as a YAML 1.2 document, keys in the same order."""
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    stream = io.StringIO()
    yaml.dump(value, stream)
    return stream.getvalue()


# ---------------------------------------------------------------------------------------------
# Tables


# How a state looks on a terminal: green holds access or went well, yellow is on its way, red
# needs a person, dim is over.
_GOOD: Final = frozenset({"ACTIVE", "APPROVED", "connected", "ok", "allowed", "active"})
_WARN_STATES: Final = frozenset({"degraded"})
_BUSY: Final = frozenset({"PENDING", "PENDING_DELIVERY", "REVOKING", "created"})
_BAD: Final = frozenset({"DENIED", "FAILED", "REVOKE_FAILED", "disconnected", "broken", "denied"})
_OVER: Final = frozenset(
    {"EXPIRED", "REVOKED", "RELEASED", "CANCELLED", "lifted", "expired", "removed", "revoked"}
)
# Columns (or FIELD rows of a details table) whose values are states.
_STATE_NAMES: Final = frozenset({"STATE", "CHAIN", "DECISION"})


def state_style(value: str) -> str:
    first = value.split(" ", 1)[0]
    if first in _GOOD:
        return "green"
    if first in _BUSY or first in _WARN_STATES:
        return "yellow"
    if first in _BAD:
        return "bold red"
    if first in _OVER:
        return "dim"
    return ""


@dataclass(frozen=True)
class Table:
    """Aligned columns under a header row; the last column is not padded. `str()` is the plain
    text (pipes, tests); `rich()` the same text with the header bold and states coloured."""

    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def _widths(self) -> list[int]:
        cells = (self.headers, *self.rows)
        return [max(cell_len(row[i]) for row in cells) for i in range(len(self.headers))]

    def _styles(self, row: tuple[str, ...]) -> list[str]:
        styles = [""] * len(row)
        if self.headers[:2] == ("FIELD", "VALUE"):
            if row[0] in _STATE_NAMES:
                styles[1] = state_style(row[1])
            return styles
        for i, header in enumerate(self.headers):
            if header in _STATE_NAMES:
                styles[i] = state_style(row[i])
        return styles

    @staticmethod
    def _line(row: tuple[str, ...], widths: list[int], styles: list[str]) -> Text:
        line = Text()
        last = len(row) - 1
        for i, (value, width, style) in enumerate(zip(row, widths, styles, strict=True)):
            line.append(value, style=style)
            if i < last:
                line.append(" " * (width - cell_len(value) + 2))
        line.rstrip()
        return line

    def rich(self) -> Text:
        widths = self._widths()
        lines = [self._line(self.headers, widths, ["bold"] * len(self.headers))]
        lines += [self._line(row, widths, self._styles(row)) for row in self.rows]
        return Text("\n").join(lines)

    def __str__(self) -> str:
        return self.rich().plain


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> Table:
    """Aligned columns under a header row; every cell made safe by `cell`."""
    return Table(tuple(headers), tuple(tuple(cell(v) for v in row) for row in rows))


def details(pairs: Iterable[tuple[str, object]]) -> Table:
    """A single object as FIELD/VALUE rows."""
    return table(("FIELD", "VALUE"), pairs)


def _labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or _NONE


# ---------------------------------------------------------------------------------------------
# Requests


def request_json(request: Request, grant: Grant | None = None) -> JSON:
    result: JSON = {
        "id": request.id,
        "state": request.state.value,
        "subject": request.subject,
        "agent": request.agent,
        "action": request.action,
        "duration": format_duration(request.duration),
        "duration_seconds": seconds(request.duration),
        "reason": request.reason,
        "rule": request.rule,
        "approvals_required": request.approvals_required,
        "approver_groups": list(request.approver_groups),
        "reviews": [
            {
                "reviewer": r.reviewer,
                "via": r.via,
                "decision": r.decision.value,
                "reason": r.reason,
                "reviewed_at": rfc3339(r.reviewed_at),
            }
            for r in request.reviews
        ],
        "created_at": rfc3339(request.created_at),
        "pending_expires_at": rfc3339(request.pending_expires_at),
        "decided_at": rfc3339(request.decided_at),
        "decided_by": request.decided_by,
        "decision_reason": request.decision_reason,
        "grant_id": request.grant_id or None,
        "grant_state": request.grant_state.value if request.grant_state else None,
        "ticket": request.ticket,
        "current_stage": request.current_stage,
        "stages": [stage_json(s) for s in request.stages],
        "policy_version": request.plan.policy_version if request.plan else None,
        "start_at": rfc3339(request.start_at),
        "selector": dict(request.selector),
        "grant_ids": list(request.grant_ids),
        "reused": request.reused,
        "extends_grant_id": request.extends_grant_id or None,
        "change_seq": request.change_seq,
    }
    if grant is not None:
        result["grant"] = grant_json(grant)
    return result


def request_stream_row(request: Request) -> str:
    """One line per change for `request watch`."""
    who = request.agent or ",".join(f"{k}={v}" for k, v in sorted(request.selector.items()))
    decided = f" by {request.decided_by}" if request.decided_by else ""
    grant = f" grant {request.grant_id} {request.grant_state.value}" if request.grant_state else ""
    return (
        f"{request.change_seq:>6}  {request.id}  {request.state.value}{decided}  "
        f"{request.subject} {request.action} on {who} for {format_duration(request.duration)}"
        f"{grant}"
    )


def option_json(option: RequestOption) -> JSON:
    return {
        "agent": option.agent,
        "labels": dict(option.labels),
        "action": option.action,
        "max_duration": format_duration(option.max_duration),
        "max_duration_seconds": seconds(option.max_duration),
        "automatic": option.plan.automatic,
        "rule": option.plan.rule,
        "policy_version": option.plan.policy_version,
        "stages": [stage_json(s) for s in option.plan.stages],
        "reason_required": option.plan.reason_required,
        "ticket_pattern": option.plan.ticket_pattern or None,
        "automatic_left": option.automatic_left,
        "granted_time_left": format_duration(option.granted_time_left)
        if option.granted_time_left is not None
        else None,
        "live_grant_id": option.live_grant_id or None,
    }


def options_table(options: Iterable[RequestOption]) -> Table:
    def approval(o: RequestOption) -> str:
        if o.plan.automatic:
            return "automatic"
        return "; ".join(
            f"{s.approvals} from {', '.join([*s.groups, *s.users])}" for s in o.plan.stages
        )

    return table(
        ("AGENT", "ACTION", "MAX", "APPROVAL", "RULE", "HELD"),
        (
            (
                o.agent,
                o.action,
                format_duration(o.max_duration),
                approval(o),
                o.plan.rule,
                o.live_grant_id or _NONE,
            )
            for o in options
        ),
    )


def stage_json(stage: ApprovalStage) -> JSON:
    return {
        "name": stage.name,
        "approvals": stage.approvals,
        "mode": stage.mode.value,
        "groups": list(stage.groups),
        "users": list(stage.users),
        "timeout": format_duration(stage.timeout) if stage.timeout else None,
        "escalation_groups": list(stage.escalation_groups),
    }


def stage_line(request: Request, index: int) -> str:
    """One stage for people: who may approve, how many have, and where the request is."""
    stage = request.stages[index]
    who = [*(f"group {g}" for g in stage.groups), *(f"user {u}" for u in stage.users)]
    text = f"{stage.name}: {stage.approvals} from " + ", ".join(who)
    if stage.mode.value == "all":
        text += " (one from each group)"
    if stage.timeout is not None:
        text += f"; after {format_duration(stage.timeout)} also " + ", ".join(
            stage.escalation_groups
        )
    approvers = [
        r.reviewer for r in request.reviews if r.stage == index and r.decision.value == "APPROVE"
    ]
    if approvers:
        text += f" [approved by {', '.join(approvers)}]"
    if request.state.value == "PENDING" and index == request.current_stage:
        text += " <- waiting"
    return text


REQUEST_HEADERS: Final = (
    "ID",
    "STATE",
    "SUBJECT",
    "AGENT",
    "ACTION",
    "DURATION",
    "CREATED",
    "GRANT",
)


def requests_table(requests: Iterable[Request], now: datetime) -> Table:
    return table(
        REQUEST_HEADERS,
        (
            (
                r.id,
                r.state.value,
                r.subject,
                r.agent,
                r.action,
                format_duration(r.duration),
                _when(r.created_at, now),
                _grant_ref(r),
            )
            for r in requests
        ),
    )


def _grant_ref(request: Request) -> str:
    if not request.grant_id:
        return _NONE
    state = f" ({request.grant_state.value})" if request.grant_state else ""
    return request.grant_id + state


def request_details(request: Request, now: datetime, grant: Grant | None = None) -> Table:
    pairs: list[tuple[str, object]] = [
        ("ID", request.id),
        ("STATE", request.state.value),
        ("SUBJECT", request.subject),
        ("AGENT", request.agent),
        ("ACTION", request.action),
        ("DURATION", format_duration(request.duration)),
        ("REASON", request.reason),
        ("RULE", request.rule),
        ("APPROVALS", _approvals(request)),
        ("CREATED", _when(request.created_at, now)),
    ]
    if request.plan is not None:
        pairs.insert(8, ("POLICY VERSION", request.plan.policy_version))
    if request.ticket:
        pairs.insert(7, ("TICKET", request.ticket))
    pairs.extend(("STAGE", stage_line(request, k)) for k in range(len(request.stages)))
    if request.selector:
        pairs.append(
            ("SELECTOR", ",".join(f"{k}={v}" for k, v in sorted(request.selector.items())))
        )
    if request.start_at is not None:
        pairs.append(
            ("STARTS", f"{human_time(request.start_at)} ({relative(request.start_at, now)})")
        )
    if request.reused:
        pairs.append(("REUSED", "a live grant you already hold"))
    if request.pending_expires_at is not None and not request.state.terminal:
        pending = request.pending_expires_at
        pairs.append(("PENDING UNTIL", f"{human_time(pending)} ({relative(pending, now)})"))
    if request.decided_at is not None:
        pairs.append(("DECIDED", f"{human_time(request.decided_at)} by {request.decided_by}"))
        pairs.append(("DECISION REASON", request.decision_reason))
    pairs.extend(
        ("REVIEW", f"{r.decision.value.lower()} by {_by(r)}: {r.reason}".rstrip(": "))
        for r in request.reviews
    )
    pairs.append(("GRANT", _grant_ref(request)))
    if grant is not None:
        pairs.append(
            ("EXPIRES", f"{human_time(grant.expires_at)} ({relative(grant.expires_at, now)})")
        )
    return details(pairs)


def _approvals(request: Request) -> str:
    if request.approvals_required == 0:
        return "none required"
    approves = sum(1 for r in request.reviews if r.decision.value == "APPROVE")
    groups = f" from {', '.join(request.approver_groups)}" if request.approver_groups else ""
    return f"{approves}/{request.approvals_required}{groups}"


# ---------------------------------------------------------------------------------------------
# Grants


def grant_json(grant: Grant) -> JSON:
    length = grant.not_after - grant.not_before
    return {
        "id": grant.id,
        "state": grant.state.value,
        "agent": grant.agent,
        "subject": grant.subject,
        "action": grant.action,
        "request_id": grant.request_id,
        "not_before": rfc3339(grant.not_before),
        "not_after": rfc3339(grant.not_after),
        "expires_at": rfc3339(grant.expires_at),
        "duration": format_duration(length),
        "duration_seconds": seconds(length),
        "offline": {
            "mode": grant.offline.mode.value,
            "grace": format_duration(grant.offline.grace),
            "grace_seconds": seconds(grant.offline.grace),
        },
        "created_at": rfc3339(grant.created_at),
        "applied_at": rfc3339(grant.applied_at),
        "ended_at": rfc3339(grant.ended_at),
        "ended_by": grant.ended_by,
        "end_reason": grant.end_reason,
        "failure": grant.failure,
        "grant_seq": grant.grant_seq,
        "revoke_seq": grant.revoke_seq,
        "epoch": grant.epoch,
        "extensions": grant.extensions,
        "original_not_after": rfc3339(grant.original_not_after),
    }


GRANT_HEADERS: Final = ("ID", "STATE", "SUBJECT", "AGENT", "ACTION", "EXPIRES", "REQUEST")


def grants_table(grants: Iterable[Grant], now: datetime) -> Table:
    return table(
        GRANT_HEADERS,
        (
            (
                g.id,
                g.state.value,
                g.subject,
                g.agent,
                g.action,
                _expiry(g, now),
                g.request_id,
            )
            for g in grants
        ),
    )


def _expiry(grant: Grant, now: datetime) -> str:
    return f"{human_time(grant.expires_at)} ({relative(grant.expires_at, now)})"


def grant_details(grant: Grant, now: datetime) -> Table:
    offline = grant.offline.mode.value
    if grant.offline.grace:
        offline += f" after {format_duration(grant.offline.grace)}"
    pairs: list[tuple[str, object]] = [
        ("ID", grant.id),
        ("STATE", grant.state.value),
        ("SUBJECT", grant.subject),
        ("AGENT", grant.agent),
        ("ACTION", grant.action),
        ("NOT BEFORE", human_time(grant.not_before)),
        ("EXPIRES", _expiry(grant, now)),
        ("OFFLINE", offline),
        ("REQUEST", grant.request_id),
        ("CREATED", human_time(grant.created_at)),
        ("APPLIED", human_time(grant.applied_at)),
    ]
    if grant.ended_at is not None:
        pairs.append(("ENDED", f"{human_time(grant.ended_at)} by {cell(grant.ended_by)}"))
        pairs.append(("END REASON", grant.end_reason))
    if grant.failure:
        pairs.append(("FAILURE", grant.failure))
    if grant.extensions:
        first = human_time(grant.original_not_after)
        pairs.append(("EXTENDED", f"{grant.extensions} time(s), first end {first}"))
    return details(pairs)


# ---------------------------------------------------------------------------------------------
# Agents


def agent_state(agent: Agent) -> str:
    return "connected" if agent.connected else "disconnected"


def agent_json(agent: Agent) -> JSON:
    return {
        "id": agent.name,
        "state": agent_state(agent),
        "name": agent.name,
        "connected": agent.connected,
        "labels": dict(agent.labels),
        "last_seen_at": rfc3339(agent.last_seen_at),
        "enrolled_at": rfc3339(agent.enrolled_at),
        "version": agent.version,
        "last_acked_seq": agent.last_acked_seq,
        "last_seq": agent.last_seq,
        "active_grants": agent.active_grants,
        "replica": agent.replica,
        "compatibility": agent.compatibility,
    }


AGENT_HEADERS: Final = ("NAME", "STATE", "LABELS", "LAST SEEN", "GRANTS", "VERSION", "REPLICA")


def agents_table(agents: Iterable[Agent], now: datetime) -> Table:
    return table(
        AGENT_HEADERS,
        (
            (
                a.name,
                agent_state(a),
                _labels(a.labels),
                _last_seen(a, now),
                a.active_grants,
                _version(a),
                a.replica or "-",
            )
            for a in agents
        ),
    )


def _version(agent: Agent) -> str:
    """The agent's version, and how the coordinator serves it when that is not fully: "compat"
    (one minor older, served the older wire) or "refused" (upgrade it: docs/wire.md)."""
    if agent.compatibility in {"compat", "refused"}:
        return f"{agent.version} ({agent.compatibility})"
    return agent.version


def _last_seen(agent: Agent, now: datetime) -> str:
    if agent.connected:
        return "now"
    if agent.last_seen_at is None:
        return "never"
    return f"{human_time(agent.last_seen_at)} ({relative(agent.last_seen_at, now)})"


def agent_details(agent: Agent, now: datetime) -> Table:
    return details(
        [
            ("NAME", agent.name),
            ("STATE", agent_state(agent)),
            ("LABELS", _labels(agent.labels)),
            ("LAST SEEN", _last_seen(agent, now)),
            ("ENROLLED", human_time(agent.enrolled_at)),
            ("VERSION", _version(agent)),
            ("ACTIVE GRANTS", agent.active_grants),
            ("REPLICA", agent.replica or "-"),
            ("COMMANDS ACKED", f"{agent.last_acked_seq} of {agent.last_seq}"),
        ]
    )


def join_token_json(token: JoinToken, labels: Mapping[str, str]) -> JSON:
    # The id `agent token list|revoke` takes, and the labels the token really carries (a
    # replacement token keeps its agent's labels when none were asked for).
    return {
        "id": token.id or "join-token",
        "state": "created",
        "token": token.token,
        "expires_at": rfc3339(token.expires_at),
        "labels": dict(token.labels or labels),
        "replaces": token.replaces or None,
    }


def join_token_details(token: JoinToken, labels: Mapping[str, str], now: datetime) -> Table:
    rows: list[tuple[str, object]] = [
        ("TOKEN", token.token),
        ("ID", token.id or _NONE),
        ("EXPIRES", f"{human_time(token.expires_at)} ({relative(token.expires_at, now)})"),
        ("LABELS", _labels(token.labels or labels)),
    ]
    if token.replaces:
        rows.append(("REPLACES", token.replaces))
    rows.append(("NOTE", "shown only once: the coordinator keeps only its hash"))
    return details(rows)


def join_token_info_json(info: JoinTokenInfo) -> JSON:
    return {
        "id": info.id,
        "labels": dict(info.labels),
        "replaces": info.replaces or None,
        "created_by": info.created_by,
        "created_at": rfc3339(info.created_at),
        "expires_at": rfc3339(info.expires_at),
        "uses_left": info.uses_left,
        "revoked_at": rfc3339(info.revoked_at),
        "revoked_by": info.revoked_by or None,
        "used_by": list(info.used_by),
    }


def join_tokens_table(infos: Sequence[JoinTokenInfo], now: datetime) -> Table:
    def state(info: JoinTokenInfo) -> str:
        if info.revoked_at is not None:
            return f"revoked by {info.revoked_by}"
        if info.expires_at is not None and info.expires_at <= now:
            return "expired"
        if info.uses_left == 0:
            return "used"
        return "live"

    return table(
        ("ID", "LABELS", "STATE", "EXPIRES", "USES LEFT", "AGENTS"),
        [
            (
                i.id,
                _labels(i.labels) + (f" (replaces {i.replaces})" if i.replaces else ""),
                state(i),
                _NONE if i.expires_at is None else relative(i.expires_at, now),
                "unlimited" if i.uses_left is None else i.uses_left,
                ",".join(i.used_by) or _NONE,
            )
            for i in infos
        ],
    )


def user_json(info: UserInfo) -> JSON:
    return {
        "id": info.name,
        "groups": list(info.groups),
        "disabled": info.disabled,
        "managed_by": info.managed_by,
        "created_at": rfc3339(info.created_at),
    }


def removed_json(name: str) -> JSON:
    return {"id": name, "state": "removed"}


def removed_table(name: str) -> Table:
    return table(("NAME", "STATE"), [(name, "removed")])


# ---------------------------------------------------------------------------------------------
# Policy


def policy_json(doc: PolicyDocument) -> JSON:
    return {
        "id": f"v{doc.version}",
        "state": "active",
        "version": doc.version,
        "sha256": doc.sha256,
        "applied_at": rfc3339(doc.applied_at),
        "applied_by": doc.applied_by,
        "yaml": doc.yaml,
    }


def policy_yaml(doc: PolicyDocument) -> str:
    """The document as applied, under a comment header: still valid YAML to apply again."""
    header = (
        f"# policy v{doc.version} sha256:{doc.sha256} "
        f"applied {human_time(doc.applied_at)} by {cell(doc.applied_by)}"
    )
    return f"{header}\n{doc.yaml.rstrip(chr(10))}"


def policy_details(doc: PolicyDocument) -> Table:
    return details(
        [
            ("VERSION", f"v{doc.version}"),
            ("SHA256", doc.sha256),
            ("APPLIED", human_time(doc.applied_at)),
            ("APPLIED BY", doc.applied_by),
        ]
    )


def decision_json(decision: PolicyDecision) -> JSON:
    return {
        "id": decision.rule,
        "state": "allowed" if decision.allowed else "denied",
        "allowed": decision.allowed,
        "rule": decision.rule,
        "explanation": decision.explanation,
        "approval_required": decision.approval_required,
        "approvals_required": decision.approvals_required,
        "approver_groups": list(decision.approver_groups),
        "max_duration": None
        if decision.max_duration is None
        else format_duration(decision.max_duration),
        "max_duration_seconds": None
        if decision.max_duration is None
        else seconds(decision.max_duration),
        "reason_required": decision.reason_required,
        "trace": list(decision.trace),
    }


def decision_details(decision: PolicyDecision) -> Table:
    if decision.allowed:
        verdict = f"allowed by rule {decision.rule}" if decision.rule else "allowed"
    else:
        verdict = "denied"
    if not decision.approval_required:
        approval = "not required"
    else:
        groups = ", ".join(decision.approver_groups) or "any approver"
        approval = f"{decision.approvals_required} from {groups}"
    pairs: list[tuple[str, object]] = [
        ("DECISION", verdict),
        ("EXPLANATION", decision.explanation),
    ]
    if decision.allowed:
        pairs += [
            ("APPROVAL", approval),
            ("MAX DURATION", duration_text(decision.max_duration)),
            ("REASON REQUIRED", "yes" if decision.reason_required else "no"),
        ]
    pairs += [("TRACE", line) for line in decision.trace]
    return details(pairs)


# ---------------------------------------------------------------------------------------------
# Audit


def event_json(event: AuditEvent) -> JSON:
    return {
        "id": event.id,
        "state": "recorded",
        "seq": event.seq,
        "at": rfc3339(event.at),
        "actor": event.actor,
        "kind": event.kind,
        "subject": event.subject,
        "agent": event.agent,
        "request_id": event.request_id,
        "grant_id": event.grant_id,
        "details": dict(event.details),
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }


EVENT_HEADERS: Final = ("SEQ", "TIME", "KIND", "ACTOR", "SUBJECT", "AGENT", "REF", "DETAILS")


def _event_row(event: AuditEvent) -> tuple[object, ...]:
    return (
        event.seq,
        human_time(event.at),
        event.kind,
        event.actor,
        event.subject,
        event.agent,
        event.grant_id or event.request_id,
        _labels(event.details),
    )


def events_table(events: Iterable[AuditEvent]) -> Table:
    return table(EVENT_HEADERS, (_event_row(e) for e in events))


# A stream cannot measure its rows first: fixed widths for every column but the last.
_STREAM_WIDTHS: Final = (8, 20, 22, 16, 20, 20, 38)


def event_stream_header() -> str:
    return _fixed(EVENT_HEADERS)


def event_stream_row(event: AuditEvent) -> str:
    return _fixed(tuple(cell(v) for v in _event_row(event)))


def _fixed(values: Sequence[str]) -> str:
    padded = [v.ljust(w) for v, w in zip(values[:-1], _STREAM_WIDTHS, strict=True)]
    return "  ".join([*padded, values[-1]]).rstrip()


def verification_json(result: ChainVerification) -> JSON:
    return {
        "id": "audit-chain",
        "state": "ok" if result.ok else "broken",
        "ok": result.ok,
        "events_checked": result.events_checked,
        "first_bad_seq": result.first_bad_seq,
        "problem": result.problem,
        "head_hash": result.head_hash,
    }


def verification_details(result: ChainVerification) -> Table:
    pairs: list[tuple[str, object]] = [
        ("CHAIN", "ok" if result.ok else "broken"),
        ("EVENTS CHECKED", result.events_checked),
        ("HEAD HASH", result.head_hash),
    ]
    if not result.ok:
        pairs += [("FIRST BAD SEQ", result.first_bad_seq), ("PROBLEM", result.problem)]
    return details(pairs)


# ---------------------------------------------------------------------------------------------
# Operator tokens and locks


def token_json(info: TokenInfo) -> JSON:
    return {
        "id": info.id,
        "state": "revoked" if info.revoked_at else "active",
        "user": info.user,
        "label": info.label,
        "created_at": rfc3339(info.created_at),
        "expires_at": rfc3339(info.expires_at),
        "revoked_at": rfc3339(info.revoked_at),
        "scopes": list(info.scopes),
    }


def token_created_details(token: str, info: TokenInfo, now: datetime) -> Table:
    return details(
        [
            ("TOKEN", token),
            ("ID", info.id),
            ("USER", info.user),
            ("EXPIRES", _when(info.expires_at, now, "never")),
            ("SCOPES", ", ".join(info.scopes) or "all the user may do"),
            ("NOTE", "shown once: the coordinator keeps only its hash"),
        ]
    )


TOKEN_HEADERS: Final = ("ID", "STATE", "USER", "LABEL", "SCOPES", "EXPIRES", "REVOKED")


def tokens_table(tokens: Iterable[TokenInfo], now: datetime) -> Table:
    return table(
        TOKEN_HEADERS,
        (
            (
                t.id,
                "revoked" if t.revoked_at else "active",
                t.user,
                t.label,
                ",".join(t.scopes) or _NONE,
                _when(t.expires_at, now, "never"),
                human_time(t.revoked_at),
            )
            for t in tokens
        ),
    )


def _by(review: Review) -> str:
    return f"{review.reviewer} via {review.via}" if review.via else review.reviewer


def _when(at: datetime | None, now: datetime, unset: str = _NONE) -> str:
    if at is None:
        return unset
    return f"{human_time(at)} ({relative(at, now)})"


def lock_state(lock: Lock, now: datetime) -> str:
    if lock.lifted_at is not None:
        return "lifted"
    return "active" if lock.in_force(now) else "expired"


def lock_json(lock: Lock, now: datetime) -> JSON:
    return {
        "id": lock.id,
        "state": lock_state(lock, now),
        "subject": lock.target.subject,
        "agent": lock.target.agent,
        "action": lock.target.action,
        "reason": lock.reason,
        "created_by": lock.created_by,
        "created_at": rfc3339(lock.created_at),
        "expires_at": rfc3339(lock.expires_at),
        "lifted_at": rfc3339(lock.lifted_at),
        "lifted_by": lock.lifted_by,
    }


LOCK_HEADERS: Final = ("ID", "TARGET", "STATE", "EXPIRES", "REASON")


def locks_table(locks: Iterable[Lock], now: datetime) -> Table:
    return table(
        LOCK_HEADERS,
        (
            (
                lock.id,
                lock.target.describe(),
                lock_state(lock, now),
                _when(lock.expires_at, now, "until lifted"),
                lock.reason,
            )
            for lock in locks
        ),
    )


# ---------------------------------------------------------------------------------------------
# Break-glass codes


def breakglass_state(code: BreakglassCode, now: datetime) -> str:
    if code.reviewed_at is not None:
        return "reviewed"
    if code.used_at is not None:
        return "used"
    if code.voided_at is not None:
        return "voided"
    return "unused" if now < code.expires_at else "expired"


def breakglass_json(code: BreakglassCode, now: datetime) -> JSON:
    return {
        "id": code.id,
        "state": breakglass_state(code, now),
        "agent": code.agent,
        "subject": code.subject,
        "action": code.action,
        "duration": format_duration(code.duration),
        "issued_at": rfc3339(code.issued_at),
        "issued_by": code.issued_by,
        "expires_at": rfc3339(code.expires_at),
        "reason": code.reason,
        "used_at": rfc3339(code.used_at),
        "grant_id": code.grant_id,
        "used_by": code.used_by,
        "reviewed_at": rfc3339(code.reviewed_at),
        "reviewed_by": code.reviewed_by,
        "review_note": code.review_note,
        "voided_at": rfc3339(code.voided_at),
    }


BREAKGLASS_HEADERS: Final = ("ID", "STATE", "AGENT", "SUBJECT", "ACTION", "FOR", "USED", "EXPIRES")


def breakglass_table(codes: Iterable[BreakglassCode], now: datetime) -> Table:
    return table(
        BREAKGLASS_HEADERS,
        (
            (
                code.id,
                breakglass_state(code, now),
                code.agent,
                code.subject,
                code.action,
                format_duration(code.duration),
                _when(code.used_at, now),
                _when(code.expires_at, now),
            )
            for code in codes
        ),
    )


# ---------------------------------------------------------------------------------------------
# Mesh status


def status_json(status: MeshStatus) -> JSON:
    return {
        "id": status.replica or "coordinator",
        "state": "degraded" if _degraded(status) else "ok",
        "coordinator_time": rfc3339(status.coordinator_time),
        "version": status.version,
        "epoch": status.epoch,
        "agents": {"enrolled": status.agents_enrolled, "connected": status.agents_connected},
        "requests": {s.value: n for s, n in sorted(status.requests.items())},
        "grants": {s.value: n for s, n in sorted(status.grants.items())},
        "revokes_unacknowledged": status.revokes_unacknowledged,
        "commands_unacknowledged": status.commands_unacknowledged,
        "policy_version": status.policy_version,
        "audit_head_seq": status.audit_head_seq,
        "locks_in_force": status.locks_in_force,
        "replicas": [
            {
                "id": r.id,
                "address": r.address,
                "version": r.version,
                "started_at": rfc3339(r.started_at),
                "last_seen_at": rfc3339(r.last_seen_at),
                "agents_connected": r.agents_connected,
            }
            for r in status.replicas
        ],
    }


def _degraded(status: MeshStatus) -> bool:
    """Something needs a person: a removal failed on a host, or agents are away."""
    failed = status.grants.get(GrantState.REVOKE_FAILED, 0)
    return failed > 0 or status.agents_connected < status.agents_enrolled


def _replicas(status: MeshStatus) -> str:
    """ "2 running: ra (this, 3 agents), rb (5 agents)"."""
    if not status.replicas:
        return _NONE
    named = [
        f"{r.id} ({'this, ' if r.id == status.replica else ''}{r.agents_connected} agents)"
        for r in status.replicas
    ]
    return f"{len(named)} running: " + ", ".join(named)


def status_details(status: MeshStatus) -> Table:
    def counts(values: Mapping[Any, int]) -> str:
        return ", ".join(f"{n} {s.value.lower()}" for s, n in sorted(values.items())) or "none"

    away = status.agents_enrolled - status.agents_connected
    return details(
        [
            ("STATE", "degraded" if _degraded(status) else "ok"),
            ("COORDINATOR", f"v{status.version} epoch {status.epoch}"),
            ("REPLICAS", _replicas(status)),
            ("AGENTS", f"{status.agents_connected} of {status.agents_enrolled} connected"
             + (f" ({away} away)" if away > 0 else "")),
            ("REQUESTS WAITING", counts(status.requests)),
            ("GRANTS", counts(status.grants)),
            ("REVOKES UNACKED", status.revokes_unacknowledged),
            ("COMMANDS UNACKED", status.commands_unacknowledged),
            ("REVOKE FAILED", status.grants.get(GrantState.REVOKE_FAILED, 0)),
            ("LOCKS IN FORCE", status.locks_in_force),
            ("POLICY", f"v{status.policy_version}"),
            ("AUDIT HEAD", status.audit_head_seq),
        ]
    )  # fmt: skip
