"""The SQL both stores run, written once.

Each statement is written in one neutral style: `?` marks its parameters, `GREATEST(` is the
larger of its arguments and `LEAST(` the smaller. At import, each store gets its own copy of
every text, translated once (`SQLITE`, `POSTGRES`), so no call translates anything:

- SQLite (aiosqlite, `?` marks): `GREATEST(` becomes `MAX(` and `LEAST(` `MIN(` (SQLite's
  max() and min() with several arguments are the same functions; the arguments here are never
  NULL, where the two differ).
- PostgreSQL (psycopg, `%s` marks): `?` becomes `%s`, and a literal `%` (`LIKE 'policy:%'`)
  becomes `%%`.

What stays in a store is what only its database can say: upserts whose conflict rules differ,
`RETURNING` over a json_each or unnest batch, `FOR UPDATE [SKIP LOCKED]`, advisory locks,
LISTEN/NOTIFY, the audit head row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

from server.store import rows as rec


def to_sqlite(sql: str) -> str:
    return sql.replace("GREATEST(", "MAX(").replace("LEAST(", "MIN(")


def to_postgres(sql: str) -> str:
    """`?` outside quoted literals becomes `%s`; every `%` is doubled (psycopg reads `%` as the
    start of a mark, inside literals too). A `?` inside a literal is refused: it would be read
    as a mark by one driver and not by the other."""
    out: list[str] = []
    quoted = False
    for char in sql:
        if char == "'":
            quoted = not quoted
        elif char == "?":
            if quoted:
                raise ValueError(f"a '?' inside a literal in {sql!r}")
            out.append("%s")
            continue
        elif char == "%":
            out.append("%%")
            continue
        out.append(char)
    return "".join(out)


@dataclass(frozen=True)
class Dialect:
    """What SQL built per call (IN lists, SET clauses, filters) needs to know of a store."""

    name: str
    mark: str  # one parameter's mark
    # Values per IN list or lookup statement (SQLite's variable limit); None: one statement.
    chunk: int | None

    def in_list(self, column: str, values: Sequence[Any], *, negate: bool = False) -> str:
        """`column IN (?,?,...)` (SQLite) or `column = ANY(%s)` (PostgreSQL, one array); its
        arguments are `self.in_args(values)`."""
        if self.chunk is None:
            return f"NOT ({column} = ANY(%s))" if negate else f"{column} = ANY(%s)"
        marks = ",".join("?" * len(values))
        return f"{column} {'NOT IN' if negate else 'IN'} ({marks})"

    def in_args(self, values: Sequence[Any]) -> list[Any]:
        return [list(values)] if self.chunk is None else list(values)

    def chunks(self, values: Sequence[Any]) -> Iterator[Sequence[Any]]:
        """`values` in pieces of at most `chunk` (none when `values` is empty)."""
        size = self.chunk or max(len(values), 1)
        for first in range(0, len(values), size):
            yield values[first : first + size]


# Ids per statement in batched updates and lookups on SQLite (well under its variable limit).
SQLITE_CHUNK = 500
SQLITE_DIALECT = Dialect("sqlite", "?", SQLITE_CHUNK)
POSTGRES_DIALECT = Dialect("postgresql", "%s", None)

REQUEST_COLUMNS = rec.columns(rec.REQUEST_COLUMNS, "r.") + ", g.state AS grant_state"
REQUEST_FROM = "requests r LEFT JOIN grants g ON g.id = r.grant_id"
GRANT_COLUMNS = rec.columns(rec.GRANT_COLUMNS)
GRANT_COLUMNS_OF_G = rec.columns(rec.GRANT_COLUMNS, "g.")
GRANT_COLUMNS_G = ", ".join(f"g.{c} AS g_{c}" for c in rec.GRANT_COLUMNS)
AUDIT_COLUMNS = rec.columns(rec.AUDIT_COLUMNS)
LOCK_COLUMNS = rec.columns(rec.LOCK_COLUMNS)
BREAKGLASS_COLUMNS = rec.columns(rec.BREAKGLASS_COLUMNS)
CHECKPOINT_COLUMNS = "seq, hash, at, key_id, signature"
LIVE_IN = ", ".join(f"'{s}'" for s in rec.LIVE_STATES)
# Grant states the expiry sweep moves; as in SQLite's partial index grants_live, whose IN list
# a query repeats to use it.
DUE_GRANT_IN = "'PENDING_DELIVERY', 'ACTIVE', 'REVOKING'"
AGENT_COLUMNS = (
    "a.name, a.labels, a.enrolled_at, a.last_seen_at, a.version, a.last_acked_seq, a.last_seq, "
    "a.replica, "
    f"(SELECT COUNT(*) FROM grants g WHERE g.agent = a.name AND g.state IN ({LIVE_IN})) "
    "AS live_grants"
)


# The tokens a bucket holds when counted again (`take_token`): `excluded` is the call's row.
_BUCKET = (
    "LEAST(excluded.burst, rate_buckets.tokens "
    "+ GREATEST(excluded.at_ms - rate_buckets.at_ms, 0) * excluded.rate)"
)


def _values(n: int) -> str:
    return ",".join("?" * n)


@dataclass(frozen=True, slots=True)
class Queries:
    """Every shared statement, in the neutral style (the defaults); `SQLITE` and `POSTGRES` hold
    each store's translation. Named after the store method that runs it."""

    # Requests, grants, agents: reads.
    get_request: str = f"SELECT {REQUEST_COLUMNS} FROM {REQUEST_FROM} WHERE r.id = ?"
    reviews_of_request: str = (
        f"SELECT {rec.REVIEW_COLUMNS} FROM reviews WHERE request_id = ? "
        "ORDER BY reviewed_at, reviewer"
    )
    audit_head: str = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1"
    get_grant: str = f"SELECT {GRANT_COLUMNS} FROM grants WHERE id = ?"
    get_agent: str = (
        f"SELECT {AGENT_COLUMNS} FROM agents a WHERE a.name = ? AND a.removed_at IS NULL"
    )
    list_agents: str = (
        f"SELECT {AGENT_COLUMNS} FROM agents a WHERE a.removed_at IS NULL ORDER BY a.name"
    )
    live_grants: str = (
        f"SELECT {GRANT_COLUMNS} FROM grants WHERE agent = ? "
        "AND state IN ('PENDING_DELIVERY', 'ACTIVE') ORDER BY grant_seq"
    )
    unremoved_grants: str = (
        f"SELECT {GRANT_COLUMNS} FROM grants WHERE agent = ? "
        "AND state IN ('REVOKING', 'REVOKE_FAILED') ORDER BY revoke_seq"
    )
    expiring_grants: str = (
        f"SELECT {GRANT_COLUMNS} FROM grants WHERE state IN ({DUE_GRANT_IN}) "
        "AND state = 'ACTIVE' AND not_after > ? AND not_after <= ? ORDER BY not_after LIMIT ?"
    )
    recent_auto_grants: str = (
        "SELECT g.not_before, g.not_after, g.ended_at FROM requests r "
        "JOIN grants g ON g.id = r.grant_id WHERE r.created_at > ? AND r.subject = ? "
        "AND r.rule = ? AND r.decided_by LIKE 'policy:%'"
    )
    pending_requests: str = (
        f"SELECT {REQUEST_COLUMNS} FROM {REQUEST_FROM} WHERE r.state = 'PENDING' "
        "ORDER BY r.created_at, r.id"
    )
    due_scheduled: str = (
        f"SELECT {REQUEST_COLUMNS} FROM {REQUEST_FROM} WHERE r.state = 'SCHEDULED' "
        "AND r.start_at <= ? ORDER BY r.start_at LIMIT ?"
    )
    next_deadline: str = (
        "SELECT MIN(t) AS t FROM ("
        "SELECT MIN(not_after) AS t FROM grants "
        "WHERE state IN ('PENDING_DELIVERY', 'ACTIVE', 'REVOKING') "
        "UNION ALL SELECT MIN(pending_expires_at) FROM requests WHERE state = 'PENDING' "
        "UNION ALL SELECT MIN(start_at) FROM requests WHERE state = 'SCHEDULED') AS d"
    )
    # Commands.
    # With the grant (or, for LOCK and UNLOCK, the lock) each names: rows.commands_after_sql.
    commands_after: str = rec.commands_after_sql("?")
    unacked_lock_commands: str = rec.unacked_lock_commands_sql("?")
    first_unacked_seq: str = (
        # A snapshot's own row is never resent (a new Hello gets a new snapshot), so an ack of
        # it lost in a crash must not hold the resume point back for ever.
        "SELECT MIN(seq) AS seq FROM commands WHERE agent = ? AND acked_at IS NULL "
        "AND kind <> 'snapshot'"
    )
    command_log_start: str = "SELECT log_start FROM agents WHERE name = ?"
    # Command-log retention (`truncate_command_log`): each agent's log_start moves up to its
    # acknowledged prefix (never down), then commands at or below it go, a batch at a time.
    advance_log_start: str = (
        "UPDATE agents SET log_start = GREATEST(log_start, LEAST(last_acked_seq, COALESCE(("
        "SELECT MIN(c.seq) - 1 FROM commands c WHERE c.agent = agents.name "
        "AND c.acked_at IS NULL AND c.kind <> 'snapshot'), last_acked_seq))) "
        # A batch of agents at a time: every write holds the one writer (SQLite) or the audit
        # head (PostgreSQL), and 10,000 agents at once held it for 0.7 s on PostgreSQL.
        "WHERE name IN (SELECT name FROM agents WHERE last_acked_seq > log_start LIMIT ?)"
    )
    truncate_commands: str = (
        "DELETE FROM commands WHERE (agent, seq) IN ("
        "SELECT c.agent, c.seq FROM agents a JOIN commands c "
        "ON c.agent = a.name AND c.seq <= a.log_start "
        "WHERE c.acked_at IS NOT NULL OR c.kind = 'snapshot' LIMIT ?)"
    )
    # Users and tokens.
    agent_for_credential: str = (
        "SELECT name FROM agents WHERE credential_hash = ? AND removed_at IS NULL"
    )
    user_groups: str = "SELECT groups FROM users WHERE name = ?"
    get_user: str = (
        "SELECT name, groups, disabled, created_at, managed_by FROM users WHERE name = ?"
    )
    get_user_record: str = "SELECT groups, disabled, managed_by FROM users WHERE name = ?"
    principal_for_token: str = (
        "SELECT u.name, u.groups, t.scopes FROM tokens t JOIN users u ON u.name = t.user_name "
        "WHERE t.hash = ? AND t.revoked_at IS NULL AND u.disabled = 0 "
        "AND (t.expires_at IS NULL OR t.expires_at > ?)"
    )
    token_holder: str = (
        "SELECT u.name, u.groups, t.scopes, t.expires_at FROM tokens t "
        "JOIN users u ON u.name = t.user_name "
        "WHERE t.hash = ? AND t.revoked_at IS NULL AND u.disabled = 0"
    )
    # Moved by triggers on users, tokens and revoked_certificates (the migrations named
    # identity-generation); no row yet reads as 0.
    identity_generation: str = "SELECT value FROM meta WHERE key = 'identity_generation'"
    versions: str = (
        "SELECT (SELECT value FROM meta WHERE key = 'identity_generation') AS g, "
        "(SELECT COALESCE(MAX(version), 0) FROM policies) AS v"
    )
    token_refusal: str = (
        "SELECT u.name, u.disabled, t.revoked_at, t.expires_at "
        "FROM tokens t JOIN users u ON u.name = t.user_name WHERE t.hash = ?"
    )
    principal_for_user: str = (
        "SELECT name, groups FROM users WHERE name = ? AND disabled = 0 "
        "AND NOT EXISTS (SELECT 1 FROM revoked_certificates WHERE serial = ?)"
    )
    list_tokens: str = (
        "SELECT hash, user_name, label, created_at, expires_at, revoked_at, scopes FROM tokens "
        "WHERE ? = '' OR user_name = ? ORDER BY created_at, hash"
    )
    list_join_tokens: str = (
        f"SELECT {rec.ENROLLMENT_COLUMNS} FROM join_tokens ORDER BY created_at, hash"
    )
    join_token_users: str = (
        "SELECT name, join_token_id FROM agents WHERE removed_at IS NULL AND join_token_id <> ''"
    )
    # Locks.
    get_lock: str = f"SELECT {LOCK_COLUMNS} FROM locks WHERE id = ?"
    lock_in_force: str = (
        f"SELECT {LOCK_COLUMNS} FROM locks WHERE lifted_at IS NULL "
        "AND (expires_at IS NULL OR expires_at > ?) AND subject IN ('', ?) "
        "AND agent IN ('', ?) AND action IN ('', ?) ORDER BY created_at, id LIMIT 1"
    )
    locks_in_force: str = (
        f"SELECT {LOCK_COLUMNS} FROM locks WHERE lifted_at IS NULL "
        "AND (expires_at IS NULL OR expires_at > ?) ORDER BY created_at, id"
    )
    # Policy, meta, audit, replicas, secrets, checkpoints.
    policy_version: str = "SELECT COALESCE(MAX(version), 0) AS v FROM policies"
    current_policy: str = (
        "SELECT yaml, version, sha256, applied_at, applied_by FROM policies "
        "ORDER BY version DESC LIMIT 1"
    )
    get_meta: str = "SELECT value FROM meta WHERE key = ?"
    audit_chain: str = f"SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > ? ORDER BY seq LIMIT ?"
    requests_changed_after: str = (
        "SELECT request_id, MAX(seq) AS last FROM audit WHERE seq > ? AND request_id <> '' "
        "GROUP BY request_id ORDER BY last LIMIT ?"
    )
    list_replicas: str = (
        "SELECT id, address, version, started_at, last_seen_at FROM replicas ORDER BY id"
    )
    get_secret: str = "SELECT ciphertext FROM secrets WHERE name = ?"
    checkpoints: str = f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY id"
    last_checkpoint: str = f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY id DESC LIMIT 1"
    # Counts for the mesh status (`status_counts`).
    count_requests: str = (
        "SELECT state, COUNT(*) AS n FROM requests WHERE state IN ('PENDING', 'SCHEDULED') "
        "GROUP BY state"
    )
    count_agents: str = (
        "SELECT COUNT(*) AS n, COALESCE(SUM(GREATEST(last_seq - last_acked_seq, 0)), 0) "
        "AS unacked FROM agents WHERE removed_at IS NULL"
    )
    count_held_by_replica: str = (
        "SELECT replica, COUNT(*) AS n FROM agents WHERE removed_at IS NULL AND replica <> '' "
        "GROUP BY replica"
    )
    count_locks: str = (
        "SELECT COUNT(*) AS n FROM locks WHERE lifted_at IS NULL "
        "AND (expires_at IS NULL OR expires_at > ?)"
    )

    # Writes in a transaction: requests, reviews, grants, commands.
    insert_request: str = (
        f"INSERT INTO requests ({rec.columns(rec.REQUEST_COLUMNS)}) "
        f"VALUES ({_values(len(rec.REQUEST_COLUMNS))})"
    )
    decide_request: str = (
        "UPDATE requests SET state = ?, decided_at = ?, decided_by = ?, decision_reason = ?, "
        "grant_id = ? WHERE id = ? AND state = ?"
    )
    set_request_grants: str = "UPDATE requests SET grant_ids = ? WHERE id = ?"
    insert_review: str = (
        "INSERT INTO reviews (request_id, reviewer, decision, reason, reviewed_at, groups, via) "
        "VALUES (?,?,?,?,?,?,?) ON CONFLICT (request_id, reviewer) DO NOTHING"
    )
    insert_grant: str = (
        f"INSERT INTO grants ({GRANT_COLUMNS}) VALUES ({_values(len(rec.GRANT_COLUMNS))})"
    )
    extend_grant: str = (
        "UPDATE grants SET not_after = ?, extensions = extensions + 1, "
        "original_not_after = COALESCE(original_not_after, not_after) "
        "WHERE id = ? AND state IN ('PENDING_DELIVERY', 'ACTIVE') AND not_after = ?"
    )
    set_grant_seq: str = "UPDATE grants SET grant_seq = ? WHERE id = ?"
    set_revoke_seq: str = "UPDATE grants SET revoke_seq = ? WHERE id = ?"
    next_command_seq: str = (
        "UPDATE agents SET last_seq = last_seq + 1 WHERE name = ? AND removed_at IS NULL "
        "RETURNING last_seq"
    )
    insert_command: str = (
        "INSERT INTO commands (agent, seq, kind, grant_id, revoke_reason, created_at) "
        "VALUES (?,?,?,?,?,?)"
    )
    settle_unsent: str = (
        "UPDATE commands SET acked_at = ?, ack_status = 'NOT_APPLIED', ack_reason = ? "
        "WHERE agent = ? AND seq = ? AND acked_at IS NULL"
    )
    supersede_commands: str = (
        "UPDATE commands SET acked_at = ?, ack_status = 'NOT_APPLIED', ack_reason = ? "
        "WHERE agent = ? AND seq < ? AND acked_at IS NULL"
    )
    # Locks.
    # A whole-fleet lock's commands, handed out in steps (domain/locks.py).
    lock_handout: str = "SELECT handout_after FROM locks WHERE id = ?"
    set_lock_handout: str = "UPDATE locks SET handout_after = ? WHERE id = ?"
    locks_handing_out: str = (
        "SELECT id FROM locks WHERE handout_after IS NOT NULL ORDER BY created_at, id"
    )
    agents_after: str = (
        "SELECT name, version FROM agents WHERE name > ? AND removed_at IS NULL "
        "ORDER BY name LIMIT ?"
    )
    insert_lock: str = (
        f"INSERT INTO locks ({LOCK_COLUMNS}) VALUES ({_values(len(rec.LOCK_COLUMNS))})"
    )
    lift_lock: str = (
        "UPDATE locks SET lifted_at = ?, lifted_by = ?, lift_reason = ? "
        "WHERE id = ? AND lifted_at IS NULL"
    )
    # Break-glass codes.
    insert_breakglass_code: str = (
        f"INSERT INTO breakglass_codes ({rec.columns(rec.BREAKGLASS_INSERT_COLUMNS)}) "
        f"VALUES ({_values(len(rec.BREAKGLASS_INSERT_COLUMNS))})"
    )
    # Per agent and signing key, the codes still usable (partial index breakglass_codes_unused).
    live_breakglass_codes: str = (
        "SELECT agent, key_id, MIN(issued_at) AS first_issued_at, "
        "MAX(issued_at) AS last_issued_at, MAX(expires_at) AS last_expires_at "
        "FROM breakglass_codes WHERE used_at IS NULL AND voided_at IS NULL AND expires_at > ? "
        "GROUP BY agent, key_id"
    )
    # The usable codes a key may have signed: recorded as its, or unrecorded (before migration
    # 0008) and issued while it was current.
    voidable_breakglass_codes: str = (
        "SELECT id, agent, subject FROM breakglass_codes "
        "WHERE used_at IS NULL AND voided_at IS NULL AND expires_at > ? "
        "AND (key_id = ? OR (key_id = '' AND issued_at >= ? AND issued_at <= ?)) "
        "ORDER BY agent, id"
    )
    void_breakglass_code: str = (
        "UPDATE breakglass_codes SET voided_at = ? "
        "WHERE id = ? AND used_at IS NULL AND voided_at IS NULL"
    )
    get_breakglass_code: str = f"SELECT {BREAKGLASS_COLUMNS} FROM breakglass_codes WHERE id = ?"
    mark_breakglass_used: str = (
        "UPDATE breakglass_codes SET used_at = ?, grant_id = ?, used_by = ? "
        "WHERE id = ? AND used_at IS NULL AND voided_at IS NULL"
    )
    review_breakglass: str = (
        "UPDATE breakglass_codes SET reviewed_at = ?, reviewed_by = ?, review_note = ? "
        "WHERE id = ? AND used_at IS NOT NULL AND reviewed_at IS NULL"
    )
    # Agents, join tokens, users, tokens, certificates.
    reenroll_agent: str = (
        "UPDATE agents SET labels = ?, credential_hash = ?, removed_at = NULL, "
        "join_token_id = ? WHERE name = ?"
    )
    enroll_agent: str = (
        "INSERT INTO agents (name, labels, credential_hash, enrolled_at, join_token_id) "
        "VALUES (?,?,?,?,?)"
    )
    agent_seen: str = (
        "UPDATE agents SET last_seen_at = ?, labels = COALESCE(?, labels), "
        "version = COALESCE(?, version), boot_id = COALESCE(?, boot_id), "
        "replica = COALESCE(?, replica) WHERE name = ?"
    )
    agent_left: str = (
        "UPDATE agents SET last_seen_at = ?, "
        "replica = CASE WHEN replica = ? THEN '' ELSE replica END WHERE name = ?"
    )
    remove_agent: str = (
        "UPDATE agents SET removed_at = ?, credential_hash = NULL "
        "WHERE name = ? AND removed_at IS NULL"
    )
    insert_join_token: str = (
        # The same secret issued again (development mode's fixed token) starts afresh.
        "INSERT INTO join_tokens "
        "(hash, labels, created_by, created_at, expires_at, max_uses, replaces) "
        "VALUES (?,?,?,?,?,?,?) ON CONFLICT (hash) DO UPDATE SET labels = excluded.labels, "
        "created_by = excluded.created_by, created_at = excluded.created_at, "
        "expires_at = excluded.expires_at, max_uses = excluded.max_uses, "
        "replaces = excluded.replaces, uses = 0"
    )
    use_join_token: str = (
        "UPDATE join_tokens SET uses = uses + 1 WHERE hash = ? AND revoked_at IS NULL "
        "AND (expires_at IS NULL OR expires_at > ?) AND (max_uses IS NULL OR uses < max_uses) "
        "RETURNING labels, replaces, max_uses IS NULL AS reusable"
    )
    revoke_join_token: str = (
        "UPDATE join_tokens SET revoked_at = ?, revoked_by = ? "
        "WHERE substr(hash, 1, 16) = ? AND revoked_at IS NULL"
    )
    upsert_user: str = (
        "INSERT INTO users (name, groups, created_at) VALUES (?,?,?) "
        "ON CONFLICT (name) DO UPDATE SET groups = excluded.groups"
    )
    insert_oidc_user: str = (
        "INSERT INTO users (name, groups, created_at, managed_by) VALUES (?,?,?,'oidc')"
    )
    set_user_disabled: str = "UPDATE users SET disabled = ? WHERE name = ?"
    insert_token: str = (
        "INSERT INTO tokens (hash, user_name, label, created_at, expires_at, scopes) "
        "VALUES (?,?,?,?,?,?) ON CONFLICT (hash) DO NOTHING"
    )
    revoke_token: str = (
        "UPDATE tokens SET revoked_at = ? WHERE substr(hash, 1, 16) = ? AND revoked_at IS NULL"
    )
    revoke_certificate: str = (
        "INSERT INTO revoked_certificates (serial, revoked_at, revoked_by, reason) "
        "VALUES (?,?,?,?) ON CONFLICT (serial) DO NOTHING"
    )
    # Policy, meta, audit, outbox, receivers.
    next_policy_version: str = "SELECT COALESCE(MAX(version), 0) + 1 AS version FROM policies"
    insert_policy: str = (
        "INSERT INTO policies (version, yaml, sha256, applied_at, applied_by) VALUES (?,?,?,?,?)"
    )
    set_meta: str = (
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    )
    insert_audit: str = (
        f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES ({_values(len(rec.AUDIT_COLUMNS))})"
    )
    insert_outbox: str = (
        f"INSERT INTO outbox ({rec.OUTBOX_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?) "
        "ON CONFLICT (event_id) DO NOTHING"
    )
    no_receivers: str = "SELECT NOT EXISTS (SELECT 1 FROM receivers) AS first"
    start_outbox_cursor: str = (
        # WHERE: SQLite reads `ON` after a bare FROM as a join's.
        "INSERT INTO meta (key, value) SELECT ?, CAST(COALESCE(MAX(seq), 0) AS TEXT) "
        "FROM outbox WHERE true ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    )
    insert_receiver: str = (
        "INSERT INTO receivers (name, kind, settings, secret, route, created_at, created_by) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING"
    )
    delete_receiver: str = "DELETE FROM receivers WHERE name = ?"
    abandon_deliveries: str = (
        "UPDATE deliveries SET state = 'GAVE_UP', last_error = 'receiver removed' "
        "WHERE receiver IN (?, ?) AND state = 'PENDING'"
    )
    # The outbox's sender (`SqlOutbox`).
    list_receivers: str = (
        "SELECT name, kind, settings, secret, route, created_at, created_by "
        "FROM receivers ORDER BY name"
    )
    unrouted: str = (
        f"SELECT seq, {rec.OUTBOX_COLUMNS} FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?"
    )
    insert_delivery: str = (
        "INSERT INTO deliveries (event_seq, receiver, state, next_at) "
        "VALUES (?, ?, 'PENDING', ?) ON CONFLICT DO NOTHING"
    )
    record_delivery: str = (
        "UPDATE deliveries SET state = ?, attempts = ?, next_at = ?, claimed_until = 0, "
        "last_error = ?, delivered_at = ? WHERE event_seq = ? AND receiver = ? "
        "AND state = 'PENDING'"
    )
    insert_attempt: str = (
        "INSERT INTO delivery_attempts (event_seq, receiver, attempt, at, ok, detail) "
        "VALUES (?, ?, ?, ?, ?, ?)"
    )
    release_delivery: str = (
        "UPDATE deliveries SET claimed_until = 0 WHERE event_seq = ? AND receiver = ? "
        "AND state = 'PENDING'"
    )
    prunable_notices: str = (
        "SELECT seq FROM outbox o WHERE o.at < ? AND o.seq <= ? AND NOT EXISTS "
        "(SELECT 1 FROM deliveries d WHERE d.event_seq = o.seq AND d.state = 'PENDING') "
        "ORDER BY seq LIMIT 5000"
    )
    next_delivery_due: str = (
        "SELECT MIN(GREATEST(next_at, claimed_until)) AS t FROM deliveries WHERE state = 'PENDING'"
    )
    # The store's own short writes (outside `Tx`).
    replica_seen: str = (
        "INSERT INTO replicas (id, address, version, started_at, last_seen_at) "
        "VALUES (?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET address = excluded.address, "
        "version = excluded.version, started_at = excluded.started_at, "
        "last_seen_at = excluded.last_seen_at"
    )
    replica_started: str = "UPDATE agents SET replica = '' WHERE replica = ?"
    # One token bucket (server/rpc/limits.py): refilled by the time since it was last counted
    # (never by a clock that went back), capped at the burst, then one token taken if there is
    # one; `refusals` counts the calls refused in a row (0: this one was allowed). One
    # statement, so replicas taking from one bucket at once never both take its last token.
    take_token: str = (
        "INSERT INTO rate_buckets (limiter, caller, tokens, at_ms, refusals, rate, burst) "
        "VALUES (?,?,?,?,0,?,?) ON CONFLICT (limiter, caller) DO UPDATE SET "
        f"tokens = CASE WHEN {_BUCKET} >= 1 THEN {_BUCKET} - 1 ELSE {_BUCKET} END, "
        f"refusals = CASE WHEN {_BUCKET} >= 1 THEN 0 ELSE rate_buckets.refusals + 1 END, "
        "at_ms = GREATEST(rate_buckets.at_ms, excluded.at_ms), rate = excluded.rate, "
        "burst = excluded.burst RETURNING refusals"
    )
    # Buckets full again: forgetting them changes nothing a caller can see.
    forget_full_buckets: str = (
        "DELETE FROM rate_buckets WHERE limiter = ? AND tokens + (? - at_ms) * rate >= burst"
    )
    delete_replica: str = "DELETE FROM replicas WHERE id = ?"
    put_secret: str = (
        "INSERT INTO secrets (name, ciphertext, updated_at) VALUES (?,?,?) ON CONFLICT (name) "
        "DO UPDATE SET ciphertext = excluded.ciphertext, updated_at = excluded.updated_at"
    )
    add_secret: str = (
        "INSERT INTO secrets (name, ciphertext, updated_at) VALUES (?,?,?) "
        "ON CONFLICT (name) DO NOTHING"
    )
    add_checkpoint: str = (
        "INSERT INTO checkpoints (seq, hash, at, key_id, signature) VALUES (?,?,?,?,?)"
    )

    def translated(self, to: Callable[[str], str]) -> Queries:
        return Queries(**{f.name: to(getattr(self, f.name)) for f in fields(self)})


NEUTRAL = Queries()
SQLITE = NEUTRAL.translated(to_sqlite)
POSTGRES = NEUTRAL.translated(to_postgres)
