"""A real agent process whose disk fills up: the kernel's file-size limit (RLIMIT_FSIZE) is set on
the running agent with prlimit(2), so from that moment no file of the process can be written
(SQLite reports an I/O error, SQLITE_IOERR_WRITE, where a full file system gives SQLITE_FULL;
the agent treats both as "cannot persist"). An apply is then refused with a failed ack and no
hook; a revoke still removes the access; the agent keeps running and the coordinator audits
both. With space back (a restart without the limit) grants work again.

The limit is set on the live process rather than at exec (preexec_fn) so that the agent starts,
enrolls and connects normally and the disk fills at a known moment: a limit at exec would let
the first few writes through (WAL frames below the limit) and fail later ones, at a point that
depends on how much the agent wrote while starting. The oracle's hook lifts the soft limit for
itself (a child inherits it): the fault is the agent's disk, the measurement must not be lost.
"""

from __future__ import annotations

import resource

import pytest

from jitmesh import GrantState
from tests.e2e.procs import wait_for

from .harness import HOLD, Cluster, audit_settled, wait_in_force, wait_removed
from .results import Recorder

pytestmark = pytest.mark.subprocess


def fill_disk(pid: int) -> None:
    """No file of process `pid` may be written from now on (soft limit 0; the hard limit stays,
    so the process's children can lift theirs)."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, hard))


async def test_full_disk_in_a_running_agent(cluster: Cluster, recorder: Recorder) -> None:
    alice = await cluster.client("alice")
    admin = await cluster.client("admin")
    web = cluster.agents["web-1"]
    held_pair, refused_pair, fresh_pair = (("alice", a) for a in HOLD[:3])
    held = await cluster.grant(alice, "web-1", HOLD[0], 600)
    await wait_in_force(web.oracle, held_pair)
    # Acked (so recorded as applied) before the disk fills.
    await cluster.wait_grant(alice, held.id, {GrantState.ACTIVE})
    pid = web.process.pid
    fill_disk(pid)
    recorder.fault("disk_full_agent_process")

    # An apply under a full disk: refused, and no hook ran.
    refused = await cluster.grant(alice, "web-1", HOLD[1], 600)
    failed = await cluster.wait_grant(alice, refused.id, {GrantState.FAILED, GrantState.ACTIVE})
    assert failed.state is GrantState.FAILED
    assert failed.failure == "cannot persist the grant"
    assert web.oracle.history().applies(refused_pair) == []

    # A revoke under a full disk: the access goes all the same.
    await admin.revoke_grant(held.id, reason="faults")
    await wait_removed(web.oracle, held_pair, 20)
    await cluster.wait_grant(
        admin, held.id, {GrantState.REVOKED, GrantState.REVOKE_FAILED}, timeout=30
    )

    # Both audited on the coordinator.
    kinds = {e.kind for e in await admin.list_audit(grant_id=refused.id)}
    assert "grant.apply_failed" in kinds, kinds
    kinds = {e.kind for e in await admin.list_audit(grant_id=held.id)}
    assert kinds & {"grant.revoked", "grant.revoke_failed"}, kinds
    # No crash (nor a crash loop): the same process keeps running through several of its
    # periodic reconciles, sweeps and heartbeats, all of which try to write, and stays connected.
    looked = web.oracle.observes()
    await wait_for(lambda: web.oracle.observes() >= looked + 3, 30, "three more reconciles")
    assert web.process.running
    assert web.process.pid == pid
    assert await cluster.connected("web-1")

    # Space back: restarted without the limit, the agent resyncs to exactly the coordinator's
    # view (the revoke it could not record arrives again; the refused grant does not) and takes
    # grants again. (Not asserted: that the unrecorded revoke is never re-applied meanwhile; the
    # agent's reconcile brings it back until the revoke is recorded, see docs/faults.md.)
    web.process.stop()
    await cluster.start_agent("web-1", new=False)
    await cluster.wait_connected("web-1")
    fresh = await cluster.grant(alice, "web-1", HOLD[2], 600)
    await cluster.wait_grant(alice, fresh.id, {GrantState.ACTIVE})
    await wait_for(lambda: web.oracle.in_force() == {fresh_pair}, 20, "only the fresh grant")
    await wait_in_force(web.oracle, fresh_pair)
    history = web.oracle.history()
    unauthorized = len(history.applies(refused_pair))
    doubles = sum(history.double_applies(p) for p in history.events)
    recorder.applies(double=doubles, unauthorized=unauthorized)
    assert unauthorized == 0
    assert doubles == 0
    await cluster.wait_grant(admin, held.id, {GrantState.REVOKED}, timeout=30)
    await audit_settled(
        recorder,
        admin,
        {refused.id: "grant.apply_failed", held.id: "grant.revoked", fresh.id: "grant.applied"},
    )
