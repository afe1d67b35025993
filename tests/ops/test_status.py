"""`jitctl status` (the Mesh.Status RPC): the mesh at a glance, for admins only, moving with
real agents, grants and revokes."""

from __future__ import annotations

import json
from datetime import timedelta

from jitmesh import GrantState, PermissionDeniedError
from tests.e2e import procs
from tests.e2e.conftest import Mesh, mesh, wait_until

__all__ = ["mesh"]


async def _status(m: Mesh, *argv: str, user: str = "admin") -> tuple[int, str, str]:
    env = {"JITMESH_COORDINATOR": m.address, "JITMESH_TOKEN": f"jmt_test-{user}"}
    return await procs.jitctl("status", *argv, env=env)


async def test_status_follows_agents_grants_and_revokes(mesh: Mesh) -> None:
    web = await mesh.start_agent("web-1", "staging")
    alice = mesh.client("alice")
    await wait_until(lambda: mesh.coordinator.registry.count() == 1, 20)
    request, _ = await alice.create_request(
        agent="web-1", action="deploy", duration=timedelta(minutes=15)
    )
    final = await alice.wait_for_request(
        request.id, until=lambda r: r.grant_state is GrantState.ACTIVE, timeout=20
    )

    code, out, err = await _status(mesh, "-o", "json")
    assert code == 0, err
    body = json.loads(out)
    assert body["state"] == "ok"
    assert body["agents"] == {"enrolled": 1, "connected": 1}
    assert body["grants"] == {"ACTIVE": 1}
    assert body["revokes_unacknowledged"] == 0
    assert body["policy_version"] >= 1
    assert body["audit_head_seq"] > 0
    # On SQLite the one coordinator is the one replica, holding the one stream.
    [replica] = body["replicas"]
    assert replica["id"] == mesh.coordinator.replica != ""
    assert replica["address"] == mesh.coordinator.address
    assert replica["agents_connected"] == 1
    assert replica["started_at"]
    assert replica["last_seen_at"]

    # The agent goes away; a revoke waits for it.
    await web.shutdown()
    await wait_until(lambda: mesh.coordinator.registry.count() == 0, 20)
    assert final.grant_id
    await mesh.client("admin").revoke_grant(final.grant_id, reason="done")
    status = await mesh.client("admin").status()
    assert status.agents_connected == 0
    assert status.grants == {GrantState.REVOKING: 1}
    assert status.revokes_unacknowledged == 1
    assert status.commands_unacknowledged >= 1

    code, out, err = await _status(mesh)
    assert code == 0, err
    lines = {line.split(None, 1)[0]: line for line in out.splitlines()[1:]}
    assert "degraded" in lines["STATE"]
    assert "0 of 1 connected (1 away)" in lines["AGENTS"]
    assert "1 revoking" in lines["GRANTS"]
    assert f"1 running: {mesh.coordinator.replica} (this, 0 agents)" in lines["REPLICAS"]


async def test_status_is_for_admins(mesh: Mesh) -> None:
    code, _out, err = await _status(mesh, user="alice")
    assert code == 4  # permission
    assert err.strip() == "jitctl: only admins and auditors may see the mesh status"
    try:
        await mesh.client("alice").status()
    except PermissionDeniedError:
        pass
    else:
        raise AssertionError("alice saw the mesh status")


async def test_grant_revoke_wait_returns_once_the_host_removed_it(mesh: Mesh) -> None:
    web = await mesh.start_agent("web-2", "staging")
    alice = mesh.client("alice")
    await wait_until(lambda: mesh.coordinator.registry.count() == 1, 20)
    request, _ = await alice.create_request(
        agent="web-2", action="deploy", duration=timedelta(minutes=15)
    )
    final = await alice.wait_for_request(
        request.id, until=lambda r: r.grant_state is GrantState.ACTIVE, timeout=20
    )
    assert web.marker("alice", "deploy").exists()
    env = {"JITMESH_COORDINATOR": mesh.address, "JITMESH_TOKEN": "jmt_test-admin"}
    code, out, err = await procs.jitctl(
        "grant", "revoke", str(final.grant_id), "--reason", "done", "--wait", "-o", "json",
        env=env,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["state"] == "REVOKED"
    # Removed on the host before the command returned, not merely asked for.
    assert not web.marker("alice", "deploy").exists()
