"""The emergency stop end to end: `jitctl lock` (the installed console script, a real process)
against a real coordinator; the access really disappears from every agent's host at once."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from jitmesh import GrantState

from . import procs
from .conftest import Mesh, wait_until


async def jitctl(mesh: Mesh, *argv: str, user: str = "admin") -> tuple[int, str, str]:
    env = {"JITMESH_COORDINATOR": mesh.address, "JITMESH_TOKEN": f"jmt_test-{user}"}
    return await procs.jitctl(*argv, env=env)


async def jitctl_json(mesh: Mesh, *argv: str) -> Any:
    code, out, err = await jitctl(mesh, *argv, "-o", "json")
    assert code == 0, err
    return json.loads(out)


async def test_lock_on_a_subject_removes_their_access_from_every_host(mesh: Mesh) -> None:
    agents = [await mesh.start_agent(f"web-{i}", "staging") for i in (1, 2, 3)]
    alice = mesh.client("alice")
    grants = []
    for running in agents:
        _, grant = await alice.create_request(
            agent=running.name, action="deploy", duration=timedelta(minutes=15)
        )
        assert grant is not None
        grants.append(grant.id)
    for running in agents:
        await wait_until(running.marker("alice", "deploy").exists)

    created = await jitctl_json(mesh, "lock", "create", "--subject", "alice", "--reason", "INC-42")
    assert (created["grants_revoked"], created["requests_denied"]) == (3, 0)
    assert (created["state"], created["subject"], created["reason"]) == (
        "active",
        "alice",
        "INC-42",
    )

    for running in agents:
        await wait_until(lambda r=running: not r.marker("alice", "deploy").exists())
    admin = mesh.client("admin")

    async def all_revoked() -> bool:
        states = [(await admin.get_grant(g)).state for g in grants]
        return states == [GrantState.REVOKED] * len(grants)

    await wait_until(all_revoked)

    code, out, err = await jitctl(
        mesh,
        "request", "create", "--agent", "web-1", "--action", "deploy", "--duration", "5m",
        user="alice",
    )  # fmt: skip
    assert code != 0
    assert out == ""
    assert f"is locked ({created['id']}): INC-42" in err
    assert len(err.strip().splitlines()) == 1
    listed = await jitctl_json(mesh, "lock", "list")
    assert [x["id"] for x in listed] == [created["id"]]

    lifted = await jitctl_json(mesh, "lock", "lift", created["id"], "--reason", "resolved")
    assert lifted["state"] == "lifted"
    assert await jitctl_json(mesh, "lock", "list") == []
    _, grant = await alice.create_request(
        agent="web-1", action="deploy", duration=timedelta(minutes=5)
    )
    assert grant is not None
    await wait_until(agents[0].marker("alice", "deploy").exists)
