"""Duplicate, replayed and reordered commands never apply twice; a revoke before its grant leaves
a tombstone that wins; a grant redelivered after a lost ack (or an agent restart) causes no second
side effect (P3). In process: the real engine on an in-memory lease store, seeded randomness."""

from __future__ import annotations

import contextlib
import random
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.domain.commands import AckStatus, CommandSpec, GrantSpec, RevokeSpec
from agent.enforcers.base import EnforcerSet
from agent.engine import Engine
from agent.store.memory import MemoryLeaseStore
from jitmesh.clock import FakeClock
from tests.support.enforcers import MemoryEnforcer

from .results import Recorder

T0 = datetime(2026, 1, 1, tzinfo=UTC)
AGENT = "web-1"


def grant_cmd(seq: int, grant_id: str, action: str) -> CommandSpec:
    spec = GrantSpec(grant_id, "alice", action, T0, T0 + timedelta(hours=1))
    return CommandSpec(seq, AGENT, seq, 1, spec, issued_at=T0)


def revoke_cmd(seq: int, grant_id: str) -> CommandSpec:
    return CommandSpec(seq, AGENT, seq, 1, RevokeSpec(grant_id), issued_at=T0)


async def engine_on(store: MemoryLeaseStore, enforcer: MemoryEnforcer) -> Engine:
    engine = Engine(
        name=AGENT,
        store=store,
        enforcers=EnforcerSet([enforcer]),
        clock=FakeClock(T0),
        skew_tolerance=timedelta(seconds=2),
    )
    await engine.start()
    return engine


def double_applies(enforcer: MemoryEnforcer) -> int:
    held: set[tuple[str, str]] = set()
    doubles = 0
    for _, op, pair in enforcer.history:
        if op == "apply":
            doubles += pair in held
            held.add(pair)
        else:
            held.discard(pair)
    return doubles


async def test_duplicates_replays_and_restarts_apply_once(
    recorder: Recorder, rng: random.Random, long_run: bool
) -> None:
    store, enforcer = MemoryLeaseStore(), MemoryEnforcer()
    engine = await engine_on(store, enforcer)
    count = 200 if long_run else 40
    log: list[CommandSpec] = []
    live: dict[str, str] = {}
    seq = 0
    for i in range(count):
        seq += 1
        grant_id = f"grt-{i:032x}"
        log.append(grant_cmd(seq, grant_id, f"a{i}"))
        live[grant_id] = f"a{i}"
        if rng.random() < 0.4:
            seq += 1
            log.append(revoke_cmd(seq, grant_id))
            del live[grant_id]
    faults = {"duplicate_command": 0, "replayed_command": 0, "agent_restart": 0}
    delivered = 0
    while delivered < len(log):
        command = log[delivered]
        ack = await engine.handle(command)
        assert ack.status is AckStatus.APPLIED, ack
        delivered += 1
        roll = rng.random()
        if roll < 0.2:
            # The same command again (a resend after a lost ack).
            assert (await engine.handle(command)).status is AckStatus.DUPLICATE
            faults["duplicate_command"] += 1
        elif roll < 0.3:
            # A replay of everything so far (a reconnect that resumes too early).
            for old in log[: delivered - 1]:
                assert (await engine.handle(old)).status is AckStatus.DUPLICATE
            faults["replayed_command"] += 1
        elif roll < 0.35:
            # The agent restarts on the same table: nothing is applied again.
            engine = await engine_on(store, enforcer)
            faults["agent_restart"] += 1
    for kind, n in faults.items():
        recorder.fault(kind, n)
    assert enforcer.in_force == {("alice", action) for action in live.values()}
    doubles = double_applies(enforcer)
    applies = sum(1 for _, op, _ in enforcer.history if op == "apply")
    recorder.applies(double=doubles, unauthorized=applies - count)
    assert doubles == 0
    assert applies == count


async def test_revoke_before_grant_leaves_a_tombstone_that_wins(recorder: Recorder) -> None:
    store, enforcer = MemoryLeaseStore(), MemoryEnforcer()
    engine = await engine_on(store, enforcer)
    grant_id = "grt-" + "e" * 32
    revoked = await engine.handle(revoke_cmd(1, grant_id))
    assert revoked.reason == "unknown grant: tombstone kept"
    late = await engine.handle(grant_cmd(2, grant_id, "deploy"))
    assert (late.status, late.reason) == (AckStatus.REJECTED, "tombstoned")
    recorder.fault("revoke_before_grant")
    # Reordered: seq 4 arrives before seq 3. The older one is never applied afterwards (it
    # can only fail closed); the coordinator's log resends in order on the next stream.
    await engine.handle(grant_cmd(4, "grt-" + "4" * 32, "restart"))
    stale = await engine.handle(grant_cmd(3, "grt-" + "3" * 32, "logs"))
    # An older seq than the last applied is a duplicate by the resume rule: never applied.
    assert stale.status is AckStatus.DUPLICATE
    recorder.fault("reordered_command")
    assert enforcer.in_force == {("alice", "restart")}
    doubles = double_applies(enforcer)
    unauthorized = sum(
        1 for _, op, pair in enforcer.history if op == "apply" and pair[1] == "deploy"
    )
    recorder.applies(double=doubles, unauthorized=unauthorized)
    assert (doubles, unauthorized) == (0, 0)


async def test_full_disk_refuses_grants_without_a_hook_and_still_revokes(
    recorder: Recorder, tmp_path: Path
) -> None:
    from agent.store.sqlite import SqliteLeaseStore

    store = SqliteLeaseStore.open(tmp_path)
    enforcer = MemoryEnforcer()
    try:
        await store.claim(AGENT, "boot")
        engine = Engine(
            name=AGENT, store=store, enforcers=EnforcerSet([enforcer]), clock=FakeClock(T0)
        )
        await engine.start()
        held = "grt-" + "1" * 32
        assert (await engine.handle(grant_cmd(1, held, "restart"))).status is AckStatus.APPLIED
        fill_disk(store)
        recorder.fault("disk_full_in_process")
        calls = len(enforcer.history)
        ack = await engine.handle(grant_cmd(2, "grt-" + "2" * 32, "deploy"))
        assert (ack.status, ack.reason) == (AckStatus.FAILED, "cannot persist the grant")
        assert len(enforcer.history) == calls  # no hook
        await engine.handle(revoke_cmd(3, held))
        assert enforcer.in_force == set()  # the revoke's hook still ran
        recorder.applies(double=double_applies(enforcer), unauthorized=0)
    finally:
        store.close()


def fill_disk(store: object) -> None:
    """PRAGMA max_page_count at the current size, then fill every page that has room."""
    db = store._db  # type: ignore[attr-defined]
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count={pages}")
    n = 0
    for size in (4096, 512, 64, 8, 1):
        with contextlib.suppress(sqlite3.Error):
            while True:
                n += 1
                db.execute(
                    "INSERT INTO leases (grant_id, subject, action, request_id, not_before_ms, "
                    "not_after_ms, offline_mode, offline_grace_ms, state, seq, removed_at_ms, "
                    "remove_reason) VALUES (?, 's', 'a', '', 0, 0, 'HOLD', 0, 'removed', 0, 0, ?)",
                    (f"fill-{n}", "x" * size),
                )
