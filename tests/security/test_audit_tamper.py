"""Audit tampering, done to the real database file behind the coordinator's back; `verify`
(the RPC behind `jitctl audit verify`) must name the first bad entry. Signed checkpoints catch
what a hash chain alone cannot: a cut-off tail and a rewrite of the whole chain."""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta

import pytest

from jitmesh.clock import from_ms
from jitmesh.types import AuditEvent
from server.domain.audit import event_hash
from tests.server.helpers import Env

MIN = timedelta(minutes=1)


async def chain(env: Env) -> tuple[int, str]:
    """A few audited actions, then a signed checkpoint of the head."""
    for _ in range(3):
        await env.alice.create_request(agent="web-1", action="logs", duration=MIN)
    coordinator = env.coordinator
    assert coordinator.checkpoints is not None
    seq, head = await coordinator.store.audit_head()
    assert await coordinator.checkpoints.append(env.clock.now()) is not None
    assert (await env.admin.verify_audit()).ok
    return seq, head


def sql(env: Env, statement: str, params: tuple[object, ...] = ()) -> list[object]:
    """One statement on the database file, behind the coordinator's back."""
    db = sqlite3.connect(env.coordinator.config.data_dir / "coordinator.db")
    try:
        found = db.execute(statement, params).fetchall()
        db.commit()
        return found
    finally:
        db.close()


def rows(env: Env) -> list[AuditEvent]:
    out = []
    for r in sql(env, "SELECT * FROM audit ORDER BY seq"):
        v = list(r)  # type: ignore[call-overload]
        out.append(
            AuditEvent(
                int(v[0]), str(v[1]), from_ms(int(v[2])), str(v[3]), str(v[4]), str(v[5]),
                str(v[6]), str(v[7]), str(v[8]), json.loads(v[9]), str(v[10]), str(v[11]),
            )
        )  # fmt: skip
    return out


async def test_modified_entry_is_named(env: Env) -> None:
    await chain(env)
    sql(env, "UPDATE audit SET actor = 'mallory' WHERE seq = 4")
    result = await env.admin.verify_audit()
    assert (result.ok, result.first_bad_seq) == (False, 4)
    assert "modified" in result.problem


async def test_deleted_entry_is_named(env: Env) -> None:
    await chain(env)
    sql(env, "DELETE FROM audit WHERE seq = 3")
    result = await env.admin.verify_audit()
    assert (result.ok, result.first_bad_seq) == (False, 3)


async def test_inserted_entry_is_named(env: Env) -> None:
    await chain(env)
    sql(env, "UPDATE audit SET seq = seq + 100 WHERE seq >= 5")
    sql(env, "UPDATE audit SET seq = seq - 99 WHERE seq >= 105")
    sql(
        env,
        "INSERT INTO audit SELECT 5, 'evt-forged', at, 'admin', 'policy.applied', subject, "
        "agent, request_id, grant_id, details, prev_hash, hash FROM audit WHERE seq = 4",
    )
    result = await env.admin.verify_audit()
    assert (result.ok, result.first_bad_seq) == (False, 5)


async def test_reordered_entries_are_named(env: Env) -> None:
    await chain(env)
    sql(env, "UPDATE audit SET seq = -1 WHERE seq = 4")
    sql(env, "UPDATE audit SET seq = 4 WHERE seq = 5")
    sql(env, "UPDATE audit SET seq = 5 WHERE seq = -1")
    result = await env.admin.verify_audit()
    assert (result.ok, result.first_bad_seq) == (False, 4)


async def test_truncated_tail_is_caught_by_the_checkpoint(env: Env) -> None:
    seq, _ = await chain(env)
    sql(env, "DELETE FROM audit WHERE seq > ?", (seq - 2,))
    result = await env.admin.verify_audit()
    assert (result.ok, result.first_bad_seq) == (False, seq - 1)
    assert "truncated" in result.problem


async def test_a_rewrite_of_the_whole_chain_is_caught_by_the_checkpoint(env: Env) -> None:
    await chain(env)
    events = rows(env)
    prev = "0" * 64
    for event in events:
        actor = "mallory" if event.seq == 2 else event.actor
        rewritten = AuditEvent(
            event.seq, event.id, event.at, actor, event.kind, event.subject, event.agent,
            event.request_id, event.grant_id, event.details, prev, "",
        )  # fmt: skip
        new_hash = event_hash(rewritten)
        sql(
            env,
            "UPDATE audit SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?",
            (actor, prev, new_hash, event.seq),
        )
        prev = new_hash
    result = await env.admin.verify_audit()
    assert result.ok is False
    assert "checkpoint" in result.problem
    assert result.first_bad_seq == events[-1].seq


@pytest.mark.parametrize("change", ["signature", "hash"])
async def test_a_forged_checkpoint_is_reported(env: Env, change: str) -> None:
    await chain(env)
    last: tuple[object, ...] = sql(  # type: ignore[assignment]
        env, "SELECT seq, hash, at, key_id, signature FROM checkpoints ORDER BY id DESC LIMIT 1"
    )[0]
    forged = list(last)
    if change == "signature":
        forged[4] = b"\x00" * 64
    else:
        forged[1] = "f" * 64
    sql(
        env,
        "INSERT INTO checkpoints (seq, hash, at, key_id, signature) VALUES (?,?,?,?,?)",
        tuple(forged),
    )
    result = await env.admin.verify_audit()
    assert result.ok is False
    assert "forged" in result.problem
