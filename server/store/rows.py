"""Rows <-> records, by column name, for every store (SQLite and PostgreSQL keep the same
columns: instants as integer epoch milliseconds, lists and objects as JSON text).

A row is any mapping from column name to value (`sqlite3.Row`, psycopg's `dict_row`): no store
reads a column by its position, so adding a column never shifts another one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from jitmesh.clock import from_ms, to_ms
from jitmesh.types import (
    Agent,
    AuditEvent,
    BreakglassCode,
    Grant,
    GrantState,
    JoinTokenInfo,
    Lock,
    LockTarget,
    OfflineMode,
    OfflinePolicy,
    PolicyDocument,
    Request,
    RequestState,
    Review,
    ReviewDecision,
    TokenInfo,
    UserInfo,
)
from server.domain.approval import plan_from_json, plan_json
from server.domain.audit import canonical_details, chain_hash
from server.domain.errors import InvalidArgument
from server.domain.models import (
    AuditEntry,
    Checkpoint,
    Command,
    CommandKind,
    GrantChange,
    IssuedCode,
    LiveCodes,
    Principal,
    ReplicaInfo,
)
from server.domain.notices import Notice, NoticeKind
from server.domain.reads import page_token_after
from server.domain.receivers import Route

Row = Mapping[str, Any]

REQUEST_COLUMNS = (
    "id", "subject", "agent", "action", "duration_ms", "reason", "state", "rule",
    "approvals_required", "approver_groups", "created_at", "pending_expires_at", "decided_at",
    "decided_by", "decision_reason", "grant_id", "plan", "ticket", "start_at", "selector",
    "grant_ids", "reused", "extends_grant_id",
)  # fmt: skip
GRANT_COLUMNS = (
    "id", "request_id", "agent", "subject", "action", "not_before", "not_after", "state",
    "offline_mode", "offline_grace_ms", "created_at", "ended_at", "ended_by", "end_reason",
    "grant_seq", "revoke_seq", "applied_at", "failure", "epoch", "extensions",
    "original_not_after", "breakglass_code_id",
)  # fmt: skip
AUDIT_COLUMNS = (
    "seq", "id", "at", "actor", "kind", "subject", "agent", "request_id", "grant_id", "details",
    "prev_hash", "hash",
)  # fmt: skip
LOCK_COLUMNS = (
    "id", "subject", "agent", "action", "reason", "created_by", "created_at", "expires_at",
    "lifted_at", "lifted_by", "lift_reason",
)  # fmt: skip
BREAKGLASS_COLUMNS = (
    "id", "agent", "subject", "action", "duration_ms", "issued_at", "issued_by", "expires_at",
    "reason", "code_hash", "used_at", "grant_id", "used_by", "reviewed_at", "reviewed_by",
    "review_note",
)  # fmt: skip
# Written at issue only: the key that signed the code (read grouped, by `live_breakglass_codes`).
BREAKGLASS_INSERT_COLUMNS = (*BREAKGLASS_COLUMNS, "key_id")
# Grant states in which a grant still holds (or may still hold) access on its host.
LIVE_STATES = ("PENDING_DELIVERY", "ACTIVE", "REVOKING", "REVOKE_FAILED")


def columns(names: tuple[str, ...], alias: str = "") -> str:
    """`a.x, a.y, ...` for a SELECT list."""
    return ", ".join(alias + n for n in names)


def ms(at: datetime | None) -> int | None:
    return None if at is None else to_ms(at)


def at(value: int | None) -> datetime | None:
    return None if value is None else from_ms(int(value))


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def request(row: Row, reviews: tuple[Review, ...]) -> Request:
    """A request row, joined with its grant's state as `grant_state`."""
    return Request(
        id=row["id"],
        subject=row["subject"],
        agent=row["agent"],
        action=row["action"],
        duration=timedelta(milliseconds=row["duration_ms"]),
        reason=row["reason"],
        state=RequestState(row["state"]),
        rule=row["rule"],
        approvals_required=row["approvals_required"],
        approver_groups=tuple(json.loads(row["approver_groups"])),
        reviews=reviews,
        created_at=from_ms(row["created_at"]),
        pending_expires_at=at(row["pending_expires_at"]),
        decided_at=at(row["decided_at"]),
        decided_by=row["decided_by"],
        decision_reason=row["decision_reason"],
        grant_id=row["grant_id"],
        grant_state=GrantState(row["grant_state"]) if row["grant_state"] else None,
        plan=plan_from_json(row["plan"]),
        ticket=row["ticket"],
        start_at=at(row["start_at"]),
        selector=json.loads(row["selector"]) if row["selector"] else {},
        grant_ids=tuple(json.loads(row["grant_ids"])) if row["grant_ids"] else (),
        reused=bool(row["reused"]),
        extends_grant_id=row["extends_grant_id"],
    )


def review(row: Row) -> Review:
    return Review(
        row["reviewer"],
        ReviewDecision(row["decision"]),
        row["reason"],
        from_ms(row["reviewed_at"]),
        tuple(json.loads(row["groups"])),
        via=row["via"],
    )


def reviews_by_request(rows: Iterable[Row]) -> dict[str, tuple[Review, ...]]:
    out: dict[str, list[Review]] = {}
    for row in rows:
        out.setdefault(row["request_id"], []).append(review(row))
    return {k: tuple(v) for k, v in out.items()}


REVIEW_COLUMNS = "request_id, reviewer, decision, reason, reviewed_at, groups, via"


def request_values(r: Request) -> tuple[Any, ...]:
    """In REQUEST_COLUMNS order."""
    return (
        r.id, r.subject, r.agent, r.action, r.duration // timedelta(milliseconds=1),
        r.reason, r.state.value, r.rule, r.approvals_required,
        json.dumps(list(r.approver_groups)), to_ms(r.created_at),
        ms(r.pending_expires_at), ms(r.decided_at), r.decided_by, r.decision_reason,
        r.grant_id, plan_json(r.plan), r.ticket, ms(r.start_at),
        json.dumps(r.selector) if r.selector else "",
        json.dumps(list(r.grant_ids)) if r.grant_ids else "", int(r.reused), r.extends_grant_id,
    )  # fmt: skip


def grant(row: Row, prefix: str = "") -> Grant:
    """A grant row; `prefix` names its columns in a join (`g_id`, ...)."""
    p = prefix
    return Grant(
        id=row[p + "id"],
        request_id=row[p + "request_id"],
        agent=row[p + "agent"],
        subject=row[p + "subject"],
        action=row[p + "action"],
        not_before=from_ms(row[p + "not_before"]),
        not_after=from_ms(row[p + "not_after"]),
        state=GrantState(row[p + "state"]),
        offline=OfflinePolicy(
            OfflineMode(row[p + "offline_mode"]),
            timedelta(milliseconds=row[p + "offline_grace_ms"]),
        ),
        created_at=from_ms(row[p + "created_at"]),
        ended_at=at(row[p + "ended_at"]),
        ended_by=row[p + "ended_by"],
        end_reason=row[p + "end_reason"],
        grant_seq=row[p + "grant_seq"],
        revoke_seq=row[p + "revoke_seq"],
        applied_at=at(row[p + "applied_at"]),
        failure=row[p + "failure"],
        epoch=row[p + "epoch"],
        extensions=row[p + "extensions"],
        original_not_after=at(row[p + "original_not_after"]),
        breakglass_code_id=row[p + "breakglass_code_id"],
    )


def grant_values(g: Grant) -> tuple[Any, ...]:
    """In GRANT_COLUMNS order."""
    return (
        g.id, g.request_id, g.agent, g.subject, g.action, to_ms(g.not_before),
        to_ms(g.not_after), g.state.value, g.offline.mode.value,
        g.offline.grace // timedelta(milliseconds=1), to_ms(g.created_at),
        ms(g.ended_at), g.ended_by, g.end_reason, g.grant_seq, g.revoke_seq,
        ms(g.applied_at), g.failure, g.epoch, g.extensions, ms(g.original_not_after),
        g.breakglass_code_id,
    )  # fmt: skip


def grant_change(change: GrantChange) -> list[tuple[str, Any]]:
    """The columns a typed grant change sets, with their stored values (unset fields stay)."""
    out: list[tuple[str, Any]] = []
    if change.ended_at is not None:
        out.append(("ended_at", to_ms(change.ended_at)))
    if change.ended_by is not None:
        out.append(("ended_by", change.ended_by))
    if change.end_reason is not None:
        out.append(("end_reason", change.end_reason))
    if change.applied_at is not None:
        out.append(("applied_at", to_ms(change.applied_at)))
    if change.failure is not None:
        out.append(("failure", change.failure))
    if change.epoch is not None:
        out.append(("epoch", change.epoch))
    return out


def audit(row: Row) -> AuditEvent:
    return AuditEvent(
        seq=int(row["seq"]),
        id=row["id"],
        at=from_ms(row["at"]),
        actor=row["actor"],
        kind=row["kind"],
        subject=row["subject"],
        agent=row["agent"],
        request_id=row["request_id"],
        grant_id=row["grant_id"],
        details=json.loads(row["details"]),
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


def agent(row: Row) -> Agent:
    """An agent row with its count of live grants as `live_grants`."""
    return Agent(
        name=row["name"],
        labels=json.loads(row["labels"]),
        connected=False,
        last_seen_at=at(row["last_seen_at"]),
        enrolled_at=from_ms(row["enrolled_at"]),
        version=row["version"],
        last_acked_seq=row["last_acked_seq"],
        last_seq=row["last_seq"],
        active_grants=row["live_grants"],
        replica=row["replica"],
    )


def lock(row: Row, prefix: str = "") -> Lock:
    """A lock row; `prefix` names its columns in a join (`l_id`, ...)."""
    p = prefix
    return Lock(
        id=row[p + "id"],
        target=LockTarget(
            subject=row[p + "subject"], agent=row[p + "agent"], action=row[p + "action"]
        ),
        reason=row[p + "reason"],
        created_by=row[p + "created_by"],
        created_at=from_ms(row[p + "created_at"]),
        expires_at=at(row[p + "expires_at"]),
        lifted_at=at(row[p + "lifted_at"]),
        lifted_by=row[p + "lifted_by"],
        lift_reason=row[p + "lift_reason"],
    )


def commands_after_sql(mark: str) -> str:
    """An agent's commands after a seq, with the grant (or lock) each names; `mark` is the
    store's placeholder (agent, seq, limit). A grant command the agent has refused (acked
    FAILED or REJECTED) is never sent again: the grant ended here with that ack, and no revoke
    follows it in the log. A snapshot's own row is never resent (it names no grant)."""
    return _commands_sql(
        f"c.agent = {mark} AND c.seq > {mark} "
        "AND (g.id IS NOT NULL OR l.id IS NOT NULL) "
        "AND NOT (c.kind = 'grant' AND c.ack_status IN ('FAILED', 'REJECTED')) "
        f"ORDER BY c.seq LIMIT {mark}"
    )


def unacked_lock_commands_sql(mark: str) -> str:
    """An agent's LOCK and UNLOCK commands not acknowledged yet, with their locks (agent)."""
    return _commands_sql(
        f"c.agent = {mark} AND c.acked_at IS NULL AND c.kind IN ('lock', 'unlock') "
        "AND l.id IS NOT NULL ORDER BY c.seq"
    )


def _commands_sql(where: str) -> str:
    """Commands with the grant (or lock) each names, in the columns `command` reads."""
    grant_columns = ", ".join(f"g.{c} AS g_{c}" for c in GRANT_COLUMNS)
    lock_columns = ", ".join(f"l.{c} AS l_{c}" for c in LOCK_COLUMNS)
    return (
        "SELECT c.seq AS c_seq, c.kind AS c_kind, c.revoke_reason AS c_revoke_reason, "
        f"{grant_columns}, {lock_columns} FROM commands c "
        "LEFT JOIN grants g ON g.id = c.grant_id AND c.kind NOT IN ('lock', 'unlock') "
        "LEFT JOIN locks l ON l.id = c.grant_id AND c.kind IN ('lock', 'unlock') "
        f"WHERE {where}"
    )


def command(row: Row, agent: str) -> Command:
    """A row of `commands_after_sql` (or `unacked_lock_commands_sql`)."""
    kind = CommandKind(row["c_kind"])
    if kind in (CommandKind.LOCK, CommandKind.UNLOCK):
        return Command(agent, row["c_seq"], kind, None, lock=lock(row, "l_"))
    return Command(agent, row["c_seq"], kind, grant(row, "g_"), row["c_revoke_reason"])


def breakglass_code(row: Row) -> BreakglassCode:
    return BreakglassCode(
        id=row["id"],
        agent=row["agent"],
        subject=row["subject"],
        action=row["action"],
        duration=timedelta(milliseconds=row["duration_ms"]),
        issued_at=from_ms(row["issued_at"]),
        issued_by=row["issued_by"],
        expires_at=from_ms(row["expires_at"]),
        reason=row["reason"],
        used_at=at(row["used_at"]),
        grant_id=row["grant_id"],
        used_by=row["used_by"],
        reviewed_at=at(row["reviewed_at"]),
        reviewed_by=row["reviewed_by"],
        review_note=row["review_note"],
    )


def breakglass_values(issued: IssuedCode) -> tuple[Any, ...]:
    """In BREAKGLASS_INSERT_COLUMNS order."""
    code = issued.code
    return (
        code.id, code.agent, code.subject, code.action,
        code.duration // timedelta(milliseconds=1), to_ms(code.issued_at), code.issued_by,
        to_ms(code.expires_at), code.reason, issued.code_hash, ms(code.used_at), code.grant_id,
        code.used_by, ms(code.reviewed_at), code.reviewed_by, code.review_note, issued.key_id,
    )  # fmt: skip


def live_codes(row: Row) -> LiveCodes:
    """A row of `live_breakglass_codes`."""
    return LiveCodes(
        agent=row["agent"],
        key_id=row["key_id"],
        first_issued_at=from_ms(row["first_issued_at"]),
        last_issued_at=from_ms(row["last_issued_at"]),
        last_expires_at=from_ms(row["last_expires_at"]),
    )


def lock_values(lock: Lock) -> tuple[Any, ...]:
    """In LOCK_COLUMNS order."""
    t = lock.target
    return (
        lock.id, t.subject, t.agent, t.action, lock.reason, lock.created_by,
        to_ms(lock.created_at), ms(lock.expires_at), ms(lock.lifted_at), lock.lifted_by,
        lock.lift_reason,
    )  # fmt: skip


def token(row: Row) -> TokenInfo:
    return TokenInfo(
        str(row["hash"])[:16],
        row["user_name"],
        row["label"],
        from_ms(row["created_at"]),
        at(row["expires_at"]),
        at(row["revoked_at"]),
        scopes=scopes_of(row["scopes"]),
    )


def token_principal(row: Row) -> Principal:
    """The caller a bearer token stands for (name, groups, scopes)."""
    return Principal(
        name=row["name"],
        groups=frozenset(json.loads(row["groups"])),
        scopes=frozenset(scopes_of(row["scopes"])),
    )


def token_refusal(row: Row | None, now: datetime) -> tuple[str, str]:
    """Why a bearer token is refused (Store.token_refusal), from its row and its user's."""
    if row is None:
        return "unknown", ""
    if row["disabled"]:
        return "disabled", str(row["name"])
    if row["revoked_at"] is not None:
        return "revoked", str(row["name"])
    if row["expires_at"] is not None and row["expires_at"] <= to_ms(now):
        return "expired", str(row["name"])
    return "unknown", ""  # refused for another reason (changed meanwhile): say nothing more


def scopes_text(scopes: Iterable[str]) -> str:
    """Scopes as the tokens table keeps them: sorted, space-separated ('' = unrestricted)."""
    return " ".join(sorted(set(scopes)))


def scopes_of(text: str) -> tuple[str, ...]:
    return tuple(text.split())


ENROLLMENT_COLUMNS = (
    "substr(hash, 1, 16) AS id, labels, COALESCE(replaces, '') AS replaces, created_by, "
    "created_at, expires_at, max_uses - uses AS uses_left, revoked_at, revoked_by"
)


def join_token_info(row: Row, used_by: Iterable[str]) -> JoinTokenInfo:
    left = row["uses_left"]
    return JoinTokenInfo(
        row["id"],
        dict(json.loads(row["labels"])),
        row["replaces"],
        row["created_by"],
        from_ms(row["created_at"]),
        at(row["expires_at"]),
        None if left is None else max(int(left), 0),
        at(row["revoked_at"]),
        row["revoked_by"],
        tuple(sorted(used_by)),
    )


def user(row: Row) -> UserInfo:
    return UserInfo(
        row["name"],
        tuple(sorted(json.loads(row["groups"]))),
        bool(row["disabled"]),
        from_ms(row["created_at"]),
        row["managed_by"],
    )


def policy(row: Row) -> PolicyDocument:
    return PolicyDocument(
        row["yaml"], row["version"], row["sha256"], from_ms(row["applied_at"]), row["applied_by"]
    )


def replica(row: Row) -> ReplicaInfo:
    return ReplicaInfo(
        row["id"],
        row["address"],
        row["version"],
        from_ms(row["started_at"]),
        from_ms(row["last_seen_at"]),
    )


def checkpoint(row: Row) -> Checkpoint:
    return Checkpoint(
        int(row["seq"]), row["hash"], from_ms(row["at"]), row["key_id"], bytes(row["signature"])
    )


def page(token: str) -> tuple[int, str] | None:
    """A list page token (`created_at_ms:id` of the last item shown), or None for the first."""
    if not token:
        return None
    ms_text, _, key = token.partition(":")
    try:
        value = int(ms_text)
    except ValueError:
        raise InvalidArgument("page token is not valid") from None
    if not 0 <= value < 2**63:
        raise InvalidArgument("page token is not valid")
    return value, key


def next_page(items: list[Request] | list[Grant], more: bool) -> str:
    return page_token_after(items[-1]) if more and items else ""


# The same text as json.dumps(..., sort_keys=True), without building an encoder per call.
details_json = json.JSONEncoder(sort_keys=True).encode


def chain(
    entries: Sequence[AuditEntry], seq: int, prev: str, skip: set[str]
) -> tuple[list[AuditEvent], list[tuple[Any, ...]]]:
    """The audit events (and their rows) that extend the chain at (seq, prev) with `entries`,
    leaving out ids in `skip` and repeated ids. Pure Python, per entry only what differs: the
    instant's and the details' encodings are reused across entries that share them (a sweep's
    entries share the instant and a few details objects). Events whose entries share one details
    object share one copy of it (events are values: nothing changes their details)."""
    events: list[AuditEvent] = []
    rows: list[tuple[Any, ...]] = []
    seen = set(skip)
    instants: dict[datetime, tuple[int, datetime]] = {}
    # By the details object (alive in `entries` throughout, so its id is its own), then by
    # contents: (canonical text, stored JSON, the events' copy).
    shared: dict[int, tuple[str, str, dict[str, str]]] = {}
    shapes: dict[tuple[tuple[str, str], ...], tuple[str, str, dict[str, str]]] = {}
    event = AuditEvent
    for entry in entries:
        if entry.id in seen:
            continue
        seen.add(entry.id)
        instant = instants.get(entry.at)
        if instant is None:
            at_ms = to_ms(entry.at)
            instant = instants[entry.at] = (at_ms, from_ms(at_ms))
        details = entry.details
        shape = shared.get(id(details))
        if shape is None:
            key = tuple(details.items())
            shape = shapes.get(key)
            if shape is None:
                shape = shapes[key] = (
                    canonical_details(details),
                    details_json(details),
                    dict(details),
                )
            shared[id(details)] = shape
        seq += 1
        digest = chain_hash(
            seq, entry.id, instant[0], entry.actor, entry.kind, entry.subject, entry.agent,
            entry.request_id, entry.grant_id, shape[0], prev,
        )  # fmt: skip
        events.append(
            event(
                seq, entry.id, instant[1], entry.actor, entry.kind, entry.subject, entry.agent,
                entry.request_id, entry.grant_id, shape[2], prev, digest,
            )
        )  # fmt: skip
        rows.append(
            (
                seq, entry.id, instant[0], entry.actor, entry.kind, entry.subject, entry.agent,
                entry.request_id, entry.grant_id, shape[1], prev, digest,
            )
        )  # fmt: skip
        prev = digest
    return events, rows


# Notifications (server/notify/): the outbox's columns and the routing cursor's meta key.
OUTBOX_COLUMNS = "event_id, kind, at, actor, subject, agent, request_id, grant_id, details"
OUTBOX_CURSOR = "outbox_routed"


def route_json(route: Route) -> str:
    return details_json(
        {
            "kinds": list(route.kinds),
            "labels": dict(route.labels),
            "actions": list(route.actions),
            "rules": list(route.rules),
            "requester": route.requester,
        }
    )


def route(text: str) -> Route:
    data = json.loads(text)
    return Route(
        kinds=tuple(data.get("kinds", ())),
        labels=dict(data.get("labels", {})),
        actions=tuple(data.get("actions", ())),
        rules=tuple(data.get("rules", ())),
        requester=bool(data.get("requester", False)),
    )


def notice(row: Row) -> Notice:
    """An outbox row (OUTBOX_COLUMNS)."""
    return Notice(
        id=row["event_id"],
        kind=NoticeKind(row["kind"]),
        at=from_ms(row["at"]),
        actor=row["actor"],
        subject=row["subject"],
        agent=row["agent"],
        request_id=row["request_id"],
        grant_id=row["grant_id"],
        details=json.loads(row["details"]),
    )


def breakglass_filter(
    *, unreviewed: bool, agent: str, subject: str, include_expired: bool, now: datetime, mark: str
) -> tuple[str, list[Any]]:
    """The WHERE clause (and its arguments, `mark` their placeholder) of a code listing."""
    where = ["1 = 1"]
    args: list[Any] = []
    if unreviewed:
        where.append("used_at IS NOT NULL AND reviewed_at IS NULL")
    elif not include_expired:
        where.append(f"(used_at IS NOT NULL OR expires_at > {mark})")
        args.append(to_ms(now))
    if agent:
        where.append(f"agent = {mark}")
        args.append(agent)
    if subject:
        where.append(f"subject = {mark}")
        args.append(subject)
    return " AND ".join(where), args
