"""Failing and hanging remove hooks end as REVOKE_FAILED (retried first, never reported revoked)
(P4); a half-done apply is rolled back to no access; a damaged lease table is moved aside, every
managed access removed, and the agent resyncs from a snapshot without a crash loop."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest

from jitmesh import GrantState
from tests.e2e.procs import wait_for

from .harness import HOLD, Cluster, audit_count, wait_in_force, wait_removed
from .results import Recorder

pytestmark = pytest.mark.subprocess


@pytest.mark.parametrize("how", ["fail-remove", "hang-remove"])
async def test_remove_hook_that_fails_or_hangs_ends_revoke_failed(
    cluster: Cluster, recorder: Recorder, how: str
) -> None:
    alice = await cluster.client("alice")
    admin = await cluster.client("admin")
    web = cluster.agents["web-1"]
    pair = ("alice", HOLD[0])
    grant = await cluster.grant(alice, "web-1", HOLD[0], 120)
    await wait_in_force(web.oracle, pair)
    web.oracle.misbehave(how)
    recorder.fault(f"hook_{how.replace('-', '_')}")
    await admin.revoke_grant(grant.id, reason="faults")
    # The first attempt failed: acked FAILED at once; the agent retries in the background.
    failed = await cluster.wait_grant(
        admin, grant.id, {GrantState.REVOKE_FAILED, GrantState.REVOKED}
    )
    assert failed.state is GrantState.REVOKE_FAILED
    listed = {g.id: g.state for g in await admin.list_grants(agent="web-1")}
    assert listed[grant.id] is GrantState.REVOKE_FAILED
    # The configured remove retries (4), then the agent reports the attempts ran out.
    log = web.oracle.root / "log"
    await wait_for(lambda: log.read_text().count(f"{how} alice {HOLD[0]}") >= 4, 30, "4 attempts")
    async with asyncio.timeout(30):
        while await audit_count(admin, grant.id, "agent.grant.revoke_failed") == 0:
            await asyncio.sleep(0.1)
    assert (await admin.get_grant(grant.id)).state is GrantState.REVOKE_FAILED
    assert await audit_count(admin, grant.id, "grant.revoked") == 0
    # The hook works again: the agent's own retries take the access away, and only then is the
    # grant reported revoked.
    web.oracle.misbehave(how, on=False)
    await wait_removed(web.oracle, pair, 30)
    done = await cluster.wait_grant(admin, grant.id, {GrantState.REVOKED})
    assert done.state is GrantState.REVOKED


async def test_half_done_apply_is_rolled_back(cluster: Cluster, recorder: Recorder) -> None:
    alice = await cluster.client("alice")
    web = cluster.agents["web-1"]
    pair = ("alice", HOLD[1])
    web.oracle.misbehave("half-apply")
    recorder.fault("hook_half_apply")
    grant = await cluster.grant(alice, "web-1", HOLD[1], 60)
    failed = await cluster.wait_grant(alice, grant.id, {GrantState.FAILED, GrantState.ACTIVE})
    assert failed.state is GrantState.FAILED
    await wait_removed(web.oracle, pair, 10)
    assert len(web.oracle.history().applies(pair)) == 1


def flip_header(db: Path) -> None:
    data = bytearray(db.read_bytes())
    data[0:16] = b"not a database!!"
    db.write_bytes(bytes(data))


def truncate(db: Path) -> None:
    os.truncate(db, 1000)


def delete_wal(db: Path) -> None:
    for part in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        part.unlink(missing_ok=True)


@pytest.mark.parametrize("damage", [flip_header, truncate, delete_wal])
async def test_damaged_lease_table(cluster: Cluster, recorder: Recorder, damage: object) -> None:
    alice = await cluster.client("alice")
    web = cluster.agents["web-1"]
    pair = ("alice", HOLD[2])
    grant = await cluster.grant(alice, "web-1", HOLD[2], 120)
    await cluster.wait_grant(alice, grant.id, {GrantState.ACTIVE})
    await wait_in_force(web.oracle, pair)
    # A clean stop first, then the table checkpointed into agent.db here: otherwise its pages may
    # still live in the WAL (the agent's own checkpoint at close is skipped when another
    # connection is open at that moment), and damage to the main file would go unseen.
    web.process.stop()
    db = web.state / "agent.db"
    checkpoint = sqlite3.connect(db)
    try:
        assert checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    finally:
        checkpoint.close()
    damage(db)  # type: ignore[operator]
    recorder.fault(f"disk_{damage.__name__}")  # type: ignore[attr-defined]
    await cluster.start_agent("web-1", new=False)
    await cluster.wait_connected("web-1")
    # Still in force at the end: the grant is valid, and the snapshot (or the intact table)
    # brings it back; never applied twice without a removal in between.
    await wait_in_force(web.oracle, pair)
    assert web.process.running
    history = web.oracle.history()
    assert history.double_applies(pair) == 0
    moved = list(web.state.glob("agent.db.corrupt-*"))
    if damage is delete_wal:
        assert moved == []
    else:
        assert moved
        # Fail closed first: removed at start, re-applied from the snapshot.
        assert len(history.removes(pair)) == 1
        assert len(history.applies(pair)) == 2
        admin = await cluster.client("admin")
        events = await admin.list_audit(agent="web-1")
        assert any(e.kind == "agent.state.moved_aside" for e in events)


async def test_drift_is_removed_while_running_and_expired_access_never_returns(
    cluster: Cluster, recorder: Recorder
) -> None:
    alice = await cluster.client("alice")
    admin = await cluster.client("admin")  # reads the audit log (admins and auditors only)
    web = cluster.agents["web-1"]
    # Access nobody granted appears on the host: the periodic reconcile removes it.
    rogue = web.oracle.root / "in" / f"mallory:{HOLD[3]}"
    rogue.touch()
    recorder.fault("drift_unknown_access")
    await wait_for(lambda: not rogue.exists(), 15, "rogue access removed")
    # A grant expires; its access is put back by hand: removed again, never restored.
    pair = ("alice", HOLD[4])
    grant = await cluster.grant(alice, "web-1", HOLD[4], 2)
    await wait_in_force(web.oracle, pair)
    await wait_removed(web.oracle, pair, 10)
    back = web.oracle.root / "in" / f"alice:{HOLD[4]}"
    back.touch()
    recorder.fault("drift_expired_access")
    await wait_for(lambda: not back.exists(), 15, "expired access removed again")
    async with asyncio.timeout(15):
        while True:
            events = await admin.list_audit(agent="web-1")
            drift = [e for e in events if e.kind == "agent.drift.removed"]
            if len(drift) >= 2:
                break
            await asyncio.sleep(0.1)
    assert {e.details.get("action") for e in drift} >= {HOLD[3], HOLD[4]}
    assert grant.id


async def test_a_hanging_remove_hook_does_not_delay_a_following_grant(
    cluster: Cluster, recorder: Recorder
) -> None:
    """The revoke's retries run in the background: while one hangs, the agent applies a grant
    for another pair (the hook's timeout is long, so the hang outlasts the grant's round trip)."""
    web = await cluster.start_agent("web-2", hook_timeout="20s")
    await cluster.wait_connected("web-2")
    alice = await cluster.client("alice")
    admin = await cluster.client("admin")
    revoked = await cluster.grant(alice, "web-2", HOLD[5], 120)
    await wait_in_force(web.oracle, ("alice", HOLD[5]))
    web.oracle.misbehave("fail-remove")
    await admin.revoke_grant(revoked.id, reason="faults")
    await cluster.wait_grant(admin, revoked.id, {GrantState.REVOKE_FAILED})
    # The next background attempt hangs.
    web.oracle.misbehave("hang-remove")
    web.oracle.misbehave("fail-remove", on=False)
    recorder.fault("hook_hang_remove")
    hang_pid = web.oracle.root / "hang.pid"
    # The hook's shell creates hang.pid before it writes its pid and newline into it.
    await wait_for(
        lambda: hang_pid.exists() and hang_pid.read_text().endswith("\n"), 20, "a retry hanging"
    )
    pid = int(hang_pid.read_text().strip())
    following = await cluster.grant(alice, "web-2", HOLD[6], 60)
    await wait_in_force(web.oracle, ("alice", HOLD[6]))
    # The host has it; the agent's ack reaches the coordinator just after (well inside the hang).
    await cluster.wait_grant(admin, following.id, {GrantState.ACTIVE}, timeout=10)
    os.kill(pid, 0)  # the hanging remove hook is still running: the grant did not wait for it
    web.oracle.misbehave("hang-remove", on=False)
    web.oracle.kill_hung_hook()
    await wait_removed(web.oracle, ("alice", HOLD[5]), 30)
    done = await cluster.wait_grant(admin, revoked.id, {GrantState.REVOKED})
    assert done.state is GrantState.REVOKED
    assert web.oracle.history().double_applies(("alice", HOLD[6])) == 0


async def test_a_restart_during_revoke_failed_keeps_retrying(
    cluster: Cluster, recorder: Recorder
) -> None:
    alice = await cluster.client("alice")
    admin = await cluster.client("admin")
    web = cluster.agents["web-1"]
    pair = ("alice", HOLD[7])
    grant = await cluster.grant(alice, "web-1", HOLD[7], 120)
    await wait_in_force(web.oracle, pair)
    web.oracle.misbehave("fail-remove")
    await admin.revoke_grant(grant.id, reason="faults")
    await cluster.wait_grant(admin, grant.id, {GrantState.REVOKE_FAILED})
    web.process.kill()
    recorder.fault("agent_kill_revoke_failed")
    log = web.oracle.root / "log"
    before = log.read_text().count(f"fail-remove alice {HOLD[7]}")
    await cluster.start_agent("web-1", new=False)
    await cluster.wait_connected("web-1")
    # The restarted agent retries the owed removal (from its lease table), still failing.
    await wait_for(
        lambda: log.read_text().count(f"fail-remove alice {HOLD[7]}") > before,
        20,
        "a retry after the restart",
    )
    assert (await admin.get_grant(grant.id)).state is GrantState.REVOKE_FAILED
    assert pair in web.oracle.in_force()
    web.oracle.misbehave("fail-remove", on=False)
    await wait_removed(web.oracle, pair, 30)
    done = await cluster.wait_grant(admin, grant.id, {GrantState.REVOKED})
    assert done.state is GrantState.REVOKED
    history = web.oracle.history()
    assert history.double_applies(pair) == 0
    assert len(history.applies(pair)) == 1  # never put back after the restart
