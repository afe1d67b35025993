"""Failing and hanging remove hooks end as REVOKE_FAILED (retried first, never reported revoked)
(P4); a half-done apply is rolled back to no access; a damaged lease table is moved aside, every
managed access removed, and the agent resyncs from a snapshot without a crash loop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jitmesh import GrantState
from tests.e2e.procs import wait_for

from .harness import HOLD, Cluster, audit_count, wait_in_force, wait_removed
from .results import Recorder

pytestmark = pytest.mark.subprocess


@pytest.fixture
async def cluster(tmp_path: Path, recorder: Recorder) -> AsyncIterator[Cluster]:
    made = Cluster(tmp_path, recorder)
    try:
        await made.start_coordinator()
        await made.apply_policy()
        await made.start_agent("web-1")
        await made.wait_connected("web-1")
        yield made
    finally:
        await made.close()


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
    failed = await cluster.wait_grant(
        admin, grant.id, {GrantState.REVOKE_FAILED, GrantState.REVOKED}
    )
    assert failed.state is GrantState.REVOKE_FAILED
    listed = {g.id: g.state for g in await admin.list_grants(agent="web-1")}
    assert listed[grant.id] is GrantState.REVOKE_FAILED
    attempts = (web.oracle.root / "log").read_text().count(f"{how} alice {HOLD[0]}")
    assert attempts >= 4  # the configured remove retries (the sweep may add its own)
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
    # A clean stop first: the table is checkpointed into agent.db (otherwise page 1 may still
    # live in the WAL and damage to the main file would go unseen until the next checkpoint).
    web.process.stop()
    db = web.state / "agent.db"
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
            events = await alice.list_audit(agent="web-1")
            drift = [e for e in events if e.kind == "agent.drift.removed"]
            if len(drift) >= 2:
                break
            await asyncio.sleep(0.1)
    assert {e.details.get("action") for e in drift} >= {HOLD[3], HOLD[4]}
    assert grant.id
