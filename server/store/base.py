"""What the SQLite and PostgreSQL stores do the same way, written once.

A store's transaction and its committed-data reads derive from the classes here and give them
two primitives, `_one` and `_all` (a statement's first row or all its rows, each row a mapping
by column name), plus the store's dialect and translated statements (`server/store/queries.py`).
Each store keeps only what its database does differently.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, ClassVar

from jitmesh.clock import from_ms, to_ms
from jitmesh.types import (
    Agent,
    AuditEvent,
    Grant,
    GrantState,
    JoinTokenInfo,
    Lock,
    LockTarget,
    PolicyDocument,
    Request,
    RequestState,
    Review,
    TokenInfo,
    UserInfo,
)
from server.domain.lifecycle import GRANT_TRANSITIONS
from server.domain.models import (
    Checkpoint,
    Command,
    CommandKind,
    GrantChange,
    Principal,
    ReplicaInfo,
    StatusCounts,
)
from server.store import rows as rec
from server.store.queries import (
    AUDIT_COLUMNS,
    GRANT_COLUMNS,
    GRANT_COLUMNS_OF_G,
    LOCK_COLUMNS,
    REQUEST_COLUMNS,
    REQUEST_FROM,
    Dialect,
    Queries,
)

# Grant states that still hold (or may hold) access; counted one by one in the mesh status.
_LIVE = list(rec.LIVE_STATES)


def lock_match(d: Dialect, target: LockTarget, alias: str) -> tuple[str, list[str]]:
    """SQL conditions (each starting with AND) for rows a lock target matches. Lock subjects are
    stored case-folded (subjects are ASCII, so SQL lower() folds them the same way)."""
    where = ""
    args: list[str] = []
    if target.subject:
        where += f" AND lower({alias}subject) = {d.mark}"
        args.append(target.subject)
    if target.agent:
        where += f" AND {alias}agent = {d.mark}"
        args.append(target.agent)
    if target.action:
        where += f" AND {alias}action = {d.mark}"
        args.append(target.action)
    return where, args


def grant_sets(
    d: Dialect, expected: Sequence[GrantState], state: GrantState, change: GrantChange
) -> tuple[str, list[Any]]:
    """The SET clause (and its arguments) of a grant compare-and-set; only lifecycle steps are
    allowed (staying in the same state updates columns only)."""
    for current in expected:
        if state is not current and state not in GRANT_TRANSITIONS[current]:
            raise ValueError(f"grant lifecycle has no step {current.value} -> {state.value}")
    sets = [f"state = {d.mark}"]
    args: list[Any] = [state.value]
    for column, value in rec.grant_change(change):
        sets.append(f"{column} = {d.mark}")
        args.append(value)
    return ", ".join(sets), args


def filters(d: Dialect, pairs: list[tuple[str, Any]]) -> tuple[list[str], list[Any]]:
    """WHERE conditions for the pairs whose value is set: a list is any of its values."""
    where: list[str] = []
    args: list[Any] = []
    for column, value in pairs:
        if isinstance(value, list):
            if value:
                where.append(d.in_list(column, value))
                args.extend(d.in_args(value))
        elif value:
            where.append(f"{column} = {d.mark}")
            args.append(value)
    return where, args


class SqlReads(ABC):
    """Reads shared by a store's transactions (on the transaction's connection) and by the
    store itself (committed data)."""

    _d: ClassVar[Dialect]
    _q: ClassVar[Queries]

    @abstractmethod
    async def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        """The statement's first row, or None."""

    @abstractmethod
    async def _all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """All the statement's rows (read at once: no cursor is held across awaits)."""

    async def _reviews(self, ids: list[str]) -> dict[str, tuple[Review, ...]]:
        if not ids:
            return {}
        rows = await self._all(
            f"SELECT {rec.REVIEW_COLUMNS} FROM reviews "
            f"WHERE {self._d.in_list('request_id', ids)} ORDER BY reviewed_at, reviewer",
            self._d.in_args(ids),
        )
        return rec.reviews_by_request(rows)

    async def _requests(self, rows: list[Any]) -> list[Request]:
        """Request rows with their reviews."""
        reviews = await self._reviews([r["id"] for r in rows])
        return [rec.request(r, reviews.get(r["id"], ())) for r in rows]

    async def get_request(self, request_id: str) -> Request | None:
        row = await self._one(self._q.get_request, [request_id])
        if row is None:
            return None
        reviews = await self._reviews([request_id])
        return rec.request(row, reviews.get(request_id, ()))

    async def get_grant(self, grant_id: str) -> Grant | None:
        row = await self._one(self._q.get_grant, [grant_id])
        return None if row is None else rec.grant(row)

    async def get_agent(self, name: str) -> Agent | None:
        row = await self._one(self._q.get_agent, [name])
        return None if row is None else rec.agent(row)

    async def list_agents(self) -> list[Agent]:
        return [rec.agent(r) for r in await self._all(self._q.list_agents)]

    async def live_grants(self, agent: str) -> list[Grant]:
        return [rec.grant(r) for r in await self._all(self._q.live_grants, [agent])]

    async def agent_for_credential(self, credential_hash: str) -> str | None:
        row = await self._one(self._q.agent_for_credential, [credential_hash])
        return None if row is None else str(row["name"])

    async def user_groups(self, name: str) -> frozenset[str] | None:
        row = await self._one(self._q.user_groups, [name])
        return None if row is None else frozenset(json.loads(row["groups"]))

    async def get_meta(self, key: str) -> str | None:
        row = await self._one(self._q.get_meta, [key])
        return None if row is None else str(row["value"])

    async def lock_in_force(
        self, subject: str, agent: str, action: str, now: datetime
    ) -> Lock | None:
        row = await self._one(self._q.lock_in_force, [to_ms(now), subject.lower(), agent, action])
        return None if row is None else rec.lock(row)


class SqlTxReads(SqlReads):
    """Reads that only a write transaction makes (on its own connection)."""

    async def get_grants(self, grant_ids: Sequence[str]) -> dict[str, Grant]:
        found: dict[str, Grant] = {}
        for chunk in self._d.chunks(grant_ids):
            rows = await self._all(
                f"SELECT {GRANT_COLUMNS} FROM grants WHERE {self._d.in_list('id', chunk)}",
                self._d.in_args(chunk),
            )
            found.update((r["id"], rec.grant(r)) for r in rows)
        return found

    async def get_lock(self, lock_id: str) -> Lock | None:
        row = await self._one(self._q.get_lock, [lock_id])
        return None if row is None else rec.lock(row)

    async def locks_in_force(self, now: datetime) -> list[Lock]:
        return [rec.lock(r) for r in await self._all(self._q.locks_in_force, [to_ms(now)])]

    async def locked_grants(self, target: LockTarget, states: Iterable[GrantState]) -> list[Grant]:
        """Grants in `states` that the target matches, on agents still enrolled, per agent in
        the order they were granted."""
        where, args = lock_match(self._d, target, "g.")
        wanted = [s.value for s in states]
        rows = await self._all(
            f"SELECT {GRANT_COLUMNS_OF_G} FROM grants g JOIN agents a ON a.name = g.agent "
            f"WHERE a.removed_at IS NULL AND {self._d.in_list('g.state', wanted)} {where} "
            "ORDER BY g.agent, g.grant_seq",
            [*self._d.in_args(wanted), *args],
        )
        return [rec.grant(r) for r in rows]

    async def pending_requests(self) -> list[Request]:
        """Every PENDING request, oldest first (a new policy judges them all)."""
        return await self._requests(await self._all(self._q.pending_requests))

    async def locked_requests(self, target: LockTarget) -> list[Request]:
        """Pending requests the target matches."""
        where, args = lock_match(self._d, target, "r.")
        rows = await self._all(
            f"SELECT {REQUEST_COLUMNS} FROM {REQUEST_FROM} WHERE r.state = 'PENDING' {where} "
            "ORDER BY r.created_at, r.id",
            args,
        )
        return await self._requests(rows)

    async def get_user_record(self, name: str) -> tuple[frozenset[str], bool, str] | None:
        row = await self._one(self._q.get_user_record, [name])
        if row is None:
            return None
        return frozenset(json.loads(row["groups"])), bool(row["disabled"]), row["managed_by"]


class SqlStoreReads(SqlReads):
    """The store's reads of committed data."""

    @abstractmethod
    async def audit_head(self) -> tuple[int, str]:
        """(seq, hash) of the chain's newest event; (0, GENESIS) when empty."""

    async def list_replicas(self) -> list[ReplicaInfo]:
        return [rec.replica(r) for r in await self._all(self._q.list_replicas)]

    async def get_secret(self, name: str) -> bytes | None:
        row = await self._one(self._q.get_secret, [name])
        return None if row is None else bytes(row["ciphertext"])

    async def checkpoints(self) -> list[Checkpoint]:
        return [rec.checkpoint(r) for r in await self._all(self._q.checkpoints)]

    async def last_checkpoint(self) -> Checkpoint | None:
        row = await self._one(self._q.last_checkpoint)
        return None if row is None else rec.checkpoint(row)

    async def _newest_first(
        self,
        select: str,
        alias: str,
        pairs: list[tuple[str, Any]],
        page_token: str,
        limit: int,
    ) -> tuple[list[Any], bool]:
        """One page of rows, newest first, after the page token; and whether more follow."""
        mark = self._d.mark
        where, args = filters(self._d, pairs)
        after = rec.page(page_token)
        if after:
            where.append(f"({alias}created_at, {alias}id) < ({mark}, {mark})")
            args.extend(after)
        sql = select + (" WHERE " + " AND ".join(where) if where else "")
        order = f" ORDER BY {alias}created_at DESC, {alias}id DESC LIMIT {mark}"
        rows = await self._all(sql + order, [*args, limit + 1])
        return rows[:limit], len(rows) > limit

    async def list_requests(
        self, *, states: Sequence[RequestState], subject: str, agent: str, limit: int,
        page_token: str,
    ) -> tuple[list[Request], str]:  # fmt: skip
        rows, more = await self._newest_first(
            f"SELECT {REQUEST_COLUMNS} FROM {REQUEST_FROM}",
            "r.",
            [("r.state", [s.value for s in states]), ("r.subject", subject), ("r.agent", agent)],
            page_token,
            limit,
        )
        requests = await self._requests(rows)
        return requests, rec.next_page(requests, more)

    async def recent_auto_grants(
        self, subject: str, rule: str, since: datetime
    ) -> list[tuple[datetime, datetime, datetime | None]]:
        """(not_before, not_after, ended_at) of the grants the policy approved by itself for
        `subject` under `rule` after `since` (an automatic grant is made with its request)."""
        rows = await self._all(self._q.recent_auto_grants, [to_ms(since), subject, rule])
        return [
            (from_ms(r["not_before"]), from_ms(r["not_after"]), rec.at(r["ended_at"])) for r in rows
        ]

    async def list_grants(
        self, *, states: Sequence[GrantState], subject: str, agent: str, limit: int,
        page_token: str,
    ) -> tuple[list[Grant], str]:  # fmt: skip
        rows, more = await self._newest_first(
            f"SELECT {GRANT_COLUMNS} FROM grants",
            "",
            [("state", [s.value for s in states]), ("subject", subject), ("agent", agent)],
            page_token,
            limit,
        )
        grants = [rec.grant(r) for r in rows]
        return grants, rec.next_page(grants, more)

    async def expiring_grants(self, after: datetime, until: datetime, limit: int) -> list[Grant]:
        """ACTIVE grants ending in (after, until], soonest first."""
        rows = await self._all(self._q.expiring_grants, [to_ms(after), to_ms(until), limit])
        return [rec.grant(r) for r in rows]

    async def unremoved_grants(self, agent: str) -> list[Grant]:
        return [rec.grant(r) for r in await self._all(self._q.unremoved_grants, [agent])]

    async def status_counts(self, now: datetime, ended_since: datetime) -> StatusCounts:
        """Counts for the mesh status and the metrics: live grants by state (the partial index
        grants_live and the agents table keep this cheap), grants ended since `ended_since`,
        pending requests, unacknowledged commands."""
        d = self._d
        grants = {
            str(r["state"]): int(r["n"])
            for r in await self._all(
                f"SELECT state, COUNT(*) AS n FROM grants WHERE {d.in_list('state', _LIVE)} "
                "GROUP BY state",
                d.in_args(_LIVE),
            )
        }
        for r in await self._all(
            f"SELECT state, COUNT(*) AS n FROM grants WHERE ended_at >= {d.mark} "
            f"AND {d.in_list('state', _LIVE, negate=True)} GROUP BY state",
            [to_ms(ended_since), *d.in_args(_LIVE)],
        ):
            grants[str(r["state"])] = int(r["n"])
        requests = {str(r["state"]): int(r["n"]) for r in await self._all(self._q.count_requests)}
        agents = await self._one(self._q.count_agents)
        locks = await self._one(self._q.count_locks, [to_ms(now)])
        policy = await self._one(self._q.policy_version)
        return StatusCounts(
            agents_enrolled=int(agents["n"]) if agents else 0,
            requests=requests,
            grants=grants,
            revokes_unacknowledged=grants.get("REVOKING", 0),
            commands_unacknowledged=int(agents["unacked"]) if agents else 0,
            locks_in_force=int(locks["n"]) if locks else 0,
            policy_version=int(policy["v"]) if policy else 0,
        )

    async def principal_for_token(self, token_hash: str, now: datetime) -> Principal | None:
        row = await self._one(self._q.principal_for_token, [token_hash, to_ms(now)])
        if row is None:
            return None
        return Principal(name=row["name"], groups=frozenset(json.loads(row["groups"])))

    async def list_tokens(self, user: str) -> list[TokenInfo]:
        return [rec.token(r) for r in await self._all(self._q.list_tokens, [user, user])]

    async def list_join_tokens(self) -> list[JoinTokenInfo]:
        tokens = await self._all(self._q.list_join_tokens)
        used: dict[str, list[str]] = {}
        for a in await self._all(self._q.join_token_users):
            used.setdefault(a["join_token_id"], []).append(a["name"])
        return [rec.join_token_info(t, used.get(t["id"], ())) for t in tokens]

    async def principal_for_user(self, name: str, serial: str) -> Principal | None:
        """The enabled user a client certificate names, unless that certificate was revoked."""
        row = await self._one(self._q.principal_for_user, [name, serial])
        if row is None:
            return None
        return Principal(name=row["name"], groups=frozenset(json.loads(row["groups"])))

    async def get_user(self, name: str) -> UserInfo | None:
        row = await self._one(self._q.get_user, [name])
        return None if row is None else rec.user(row)

    async def commands_after(self, agent: str, seq: int, limit: int) -> list[Command]:
        rows = await self._all(self._q.commands_after, [agent, seq, limit])
        return [
            Command(
                agent,
                r["c_seq"],
                CommandKind(r["c_kind"]),
                rec.grant(r, "g_"),
                r["c_revoke_reason"],
            )
            for r in rows
        ]

    async def first_unacked_seq(self, agent: str) -> int | None:
        row = await self._one(self._q.first_unacked_seq, [agent])
        return None if row is None or row["seq"] is None else int(row["seq"])

    async def policy_version(self) -> int:
        """The newest policy version (0: none)."""
        row = await self._one(self._q.policy_version)
        return 0 if row is None else int(row["v"])

    async def current_policy(self) -> PolicyDocument | None:
        row = await self._one(self._q.current_policy)
        return None if row is None else rec.policy(row)

    async def list_audit(
        self, *, since: datetime | None, agent: str, subject: str, kind: str, grant_id: str,
        request_id: str, after_seq: int, limit: int,
    ) -> list[AuditEvent]:  # fmt: skip
        mark = self._d.mark
        where, args = filters(
            self._d,
            [("agent", agent), ("subject", subject), ("kind", kind), ("grant_id", grant_id),
             ("request_id", request_id)],
        )  # fmt: skip
        where.append(f"seq > {mark}")
        args.append(after_seq)
        if since is not None:
            where.append(f"at >= {mark}")
            args.append(to_ms(since))
        rows = await self._all(
            f"SELECT {AUDIT_COLUMNS} FROM audit WHERE {' AND '.join(where)} "
            f"ORDER BY seq LIMIT {mark}",
            [*args, limit],
        )
        return [rec.audit(r) for r in rows]

    async def due_scheduled(self, now: datetime, limit: int) -> list[Request]:
        """SCHEDULED requests whose start has come, earliest first."""
        return await self._requests(await self._all(self._q.due_scheduled, [to_ms(now), limit]))

    async def requests_changed_after(self, after_seq: int, limit: int) -> list[tuple[str, int]]:
        """(request id, its latest audit seq) for requests with audit events after
        `after_seq`, in the order of those latest changes; plus, when `after_seq` is negative,
        nothing but the head: [("", head seq)]."""
        if after_seq < 0:
            return [("", (await self.audit_head())[0])]
        rows = await self._all(self._q.requests_changed_after, [after_seq, limit])
        return [(r["request_id"], int(r["last"])) for r in rows]

    async def audit_chain(self, after_seq: int, limit: int) -> list[AuditEvent]:
        return [rec.audit(r) for r in await self._all(self._q.audit_chain, [after_seq, limit])]

    async def next_deadline(self) -> datetime | None:
        row = await self._one(self._q.next_deadline)
        return None if row is None or row["t"] is None else from_ms(int(row["t"]))

    async def list_locks(self, *, include_ended: bool, now: datetime) -> list[Lock]:
        sql = f"SELECT {LOCK_COLUMNS} FROM locks"
        args: list[Any] = []
        if not include_ended:
            sql += " WHERE lifted_at IS NULL AND (expires_at IS NULL OR expires_at > "
            sql += f"{self._d.mark})"
            args.append(to_ms(now))
        rows = await self._all(sql + " ORDER BY created_at DESC, id DESC LIMIT 1000", args)
        return [rec.lock(r) for r in rows]
