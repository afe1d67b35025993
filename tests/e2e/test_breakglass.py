"""Break-glass end to end, with real processes: codes issued through `jitctl`, the coordinator
stopped, a real agent honouring a code on its own (once, and not a forged one), the emergency
lease ending on its own, and the coordinator adopting, auditing and listing the use for review
once it is back."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from jitmesh import Client, GrantState
from jitmesh.v1 import breakglass_pb2

from .procs import (
    BIN,
    Proc,
    agent,
    check,
    coordinator,
    free_port,
    jitctl,
    read_env,
    wait_for,
    wait_healthy,
)

pytestmark = pytest.mark.subprocess


def present(state: Path, code: str) -> subprocess.CompletedProcess[str]:
    """`jitmesh-agent breakglass` as the operator on the host types it (a real process)."""
    return subprocess.run(
        [str(BIN / "jitmesh-agent"), "breakglass", "--state", str(state), code],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def forged(code: str) -> list[str]:
    """Two forgeries of a genuine code: its body changed (another subject) under the original
    signature, and a new body signed by a key the agent never pinned."""
    signed = breakglass_pb2.BreakglassCode.FromString(unb64(code))
    body = breakglass_pb2.BreakglassGrant.FromString(signed.body)
    body.subject = "mallory"
    altered = breakglass_pb2.BreakglassCode(
        body=body.SerializeToString(), key_id=signed.key_id, signature=signed.signature
    )
    key = SigningKey.generate()
    data = body.SerializeToString()
    foreign = breakglass_pb2.BreakglassCode(
        body=data,
        key_id=signed.key_id,
        signature=key.sign(b"jitmesh-breakglass/v1\n" + data).signature,
    )
    return [b64(altered.SerializeToString()), b64(foreign.SerializeToString())]


async def jitctl_json(env: dict[str, str], *argv: str) -> Any:
    code, out, err = await jitctl(*argv, "-o", "json", env=env)
    assert code == 0, err
    return json.loads(out)


async def wait_connected(client: Client, name: str, connected: bool = True) -> None:
    async with asyncio.timeout(30):
        while True:
            agents = {a.name: a for a in await client.list_agents()}
            if name in agents and agents[name].connected is connected:
                return
            await asyncio.sleep(0.05)


@dataclass
class Host:
    """A `jitmesh-coordinator dev` process and one real agent, db-1 (env=prod, file enforcer
    writing into `access`), connected."""

    address: str
    coord: Proc
    agent: Proc
    state: Path
    access: Path
    admin_token: str
    admin_env: dict[str, str]


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    port = free_port()
    address = f"127.0.0.1:{port}"
    data = tmp_path / "coordinator"
    coord = coordinator(data, port)
    access = tmp_path / "access"
    access.mkdir()
    state = tmp_path / "db-1"
    coord.start()
    db1 = None
    try:
        await wait_healthy(address)
        await wait_for(lambda: (data / "dev.env").exists(), 20, "dev.env")
        env = read_env(data / "dev.env")
        token = env["JITMESH_TOKEN_ADMIN"]
        db1 = agent(address, "db-1", "env=prod", env["JITMESH_JOIN_TOKEN"], state, access)
        db1.start()
        async with await Client.connect(address, token=token) as admin:
            await wait_connected(admin, "db-1")
        yield Host(
            address, coord, db1, state, access, token,
            {"JITMESH_COORDINATOR": address, "JITMESH_TOKEN": token},
        )  # fmt: skip
    finally:
        if db1 is not None:
            db1.stop()
        coord.stop()


async def test_breakglass_while_the_coordinator_is_down(host: Host, tmp_path: Path) -> None:
    address, coord, state, admin_env = host.address, host.coord, host.state, host.admin_env
    marker = host.access / "alice:shell"
    issued = await jitctl_json(
        admin_env,
        "breakglass", "issue", "--agent", "db-1", "--action", "shell", "--subject", "alice",
        "--duration", "6s", "--valid-for", "1d", "--count", "2", "--reason", "on-call kit",
    )  # fmt: skip
    assert [c["state"] for c in issued] == ["unused", "unused"]
    first, second = issued
    listed = await jitctl_json(admin_env, "breakglass", "list")
    assert {c["id"] for c in listed} == {first["id"], second["id"]}
    assert all("code" not in c for c in listed)  # the text is shown once, at issue

    # The coordinator goes away; the host is on its own.
    coord.stop()
    for fake in forged(second["code"]):
        refused = present(state, fake)
        assert refused.returncode != 0
        assert "not issued by this host's coordinator" in refused.stderr
    assert fake not in refused.stderr
    assert fake not in refused.stdout
    assert not marker.exists()

    used = present(state, first["code"])
    assert used.returncode == 0, used.stderr
    grant_id = f"bg-{first['id']}"
    assert f"grant_id={grant_id}" in used.stdout
    assert marker.exists()
    assert check(state, "alice", "shell") == 0

    again = present(state, first["code"])
    assert again.returncode != 0
    assert "used already" in again.stderr

    # The emergency lease ends on its own, coordinator or not.
    await wait_for(lambda: not marker.exists(), 30, "the break-glass lease to expire")
    assert check(state, "alice", "shell") == 1
    log = (tmp_path / "db-1.log").read_text()
    assert "break-glass code used" in log
    assert first["code"] not in log
    assert second["code"] not in log

    # Back: the use is adopted into the record and the audit log, listed for review.
    coord.start()
    await wait_healthy(address)
    async with await Client.connect(address, token=host.admin_token) as admin:
        await wait_connected(admin, "db-1")

        async def adopted() -> bool:
            events = await admin.list_audit(grant_id=grant_id)
            return any(e.kind == "breakglass.used" for e in events)

        async with asyncio.timeout(20):
            while not await adopted():
                await asyncio.sleep(0.05)
        grant = await admin.get_grant(grant_id)
        assert grant.breakglass_code_id == first["id"]
        assert (grant.subject, grant.agent, grant.action) == ("alice", "db-1", "shell")
        assert grant.not_after - grant.not_before == timedelta(seconds=6)
        async with asyncio.timeout(20):
            while (await admin.get_grant(grant_id)).state is not GrantState.EXPIRED:
                await asyncio.sleep(0.05)
        events = await admin.list_audit(grant_id=grant_id)
        assert [e.kind for e in events].count("breakglass.used") == 1
        used_event = next(e for e in events if e.kind == "breakglass.used")
        assert used_event.subject == "alice"
        assert used_event.details["code_id"] == first["id"]
        assert used_event.details["caller"] == "root"
        everything = json.dumps([e.details for e in await admin.list_audit(limit=1000)])
        assert first["code"] not in everything
        assert second["code"] not in everything

    unreviewed = await jitctl_json(admin_env, "breakglass", "list", "--unreviewed")
    assert [(c["id"], c["state"], c["grant_id"]) for c in unreviewed] == [
        (first["id"], "used", grant_id)
    ]
    reviewed = await jitctl_json(
        admin_env, "breakglass", "review", first["id"], "--note", "INC-7: checked"
    )
    assert (reviewed["state"], reviewed["reviewed_by"]) == ("reviewed", "admin")
    assert await jitctl_json(admin_env, "breakglass", "list", "--unreviewed") == []
    code, _, err = await jitctl("breakglass", "review", first["id"], env=admin_env)
    assert code != 0
    assert "reviewed already" in err
    async with await Client.connect(address, token=host.admin_token) as admin:
        kinds = [e.kind for e in await admin.list_audit(grant_id=grant_id)]
        assert "breakglass.reviewed" in kinds


def kept_locks(state: Path) -> list[str]:
    """The lock ids the agent keeps, read from its lease table (WAL: readers never block it)."""
    db = sqlite3.connect(state / "agent.db")
    try:
        return [row[0] for row in db.execute("SELECT lock_id FROM locks ORDER BY lock_id")]
    finally:
        db.close()


async def test_a_lock_kept_by_the_agent_refuses_a_code_while_cut_off(host: Host) -> None:
    address, coord, state, admin_env = host.address, host.coord, host.state, host.admin_env
    access = host.access
    (issued,) = await jitctl_json(
        admin_env,
        "breakglass", "issue", "--agent", "db-1", "--action", "shell", "--subject", "alice",
        "--duration", "10m", "--valid-for", "1d",
    )  # fmt: skip
    lock = await jitctl_json(
        admin_env, "lock", "create", "--subject", "alice", "--reason", "INC-9: laptop stolen"
    )
    await wait_for(lambda: kept_locks(state) == [lock["id"]], 15, "the agent to keep the lock")

    coord.stop()
    refused = present(state, issued["code"])
    assert refused.returncode != 0
    assert f"locked by the coordinator ({lock['id']}): INC-9" in refused.stderr
    assert not (access / "alice:shell").exists()

    coord.start()
    await wait_healthy(address)
    await jitctl_json(admin_env, "lock", "lift", lock["id"], "--reason", "laptop found")
    await wait_for(lambda: kept_locks(state) == [], 20, "the agent to forget the lock")
    used = present(state, issued["code"])
    assert used.returncode == 0, used.stderr
    assert (access / "alice:shell").exists()
    async with await Client.connect(address, token=host.admin_token) as admin:
        grant_id = f"bg-{issued['id']}"

        async def adopted() -> bool:
            return any(
                e.kind == "breakglass.used" for e in await admin.list_audit(grant_id=grant_id)
            )

        async with asyncio.timeout(20):
            while not await adopted():
                await asyncio.sleep(0.05)
        assert (await admin.get_grant(grant_id)).state is GrantState.ACTIVE
