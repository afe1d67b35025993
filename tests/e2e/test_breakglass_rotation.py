"""A break-glass code survives a signing-key rotation, with real processes: a code issued through
`jitctl`, the key that signed it rotated out (`jitmesh-coordinator rotate-signing-key`) and its
command overlap past by the coordinator's clock, the real agent reconnected after each step to
learn the new keys, then the coordinator stopped: the agent still honours the code on its own,
and the coordinator adopts and audits the use once it is back.

The coordinator runs under `tests.support.clocked_coordinator` (the real program, built with a
wall clock this test moves while it is stopped), so a day passes without waiting for it. The
agent is the installed `jitmesh-agent`, on the real clock: the coordinator's time in each
Welcome moves the agent's own "now" forward with it (agent/engine/clocktrust.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jitmesh import Client
from jitmesh.v1 import breakglass_pb2
from server.signing import ROTATION_OVERLAP

from .procs import BIN, Proc, agent, free_port, read_env, wait_for, wait_healthy
from .test_breakglass import jitctl_json, present, unb64, wait_connected

pytestmark = pytest.mark.subprocess


def coordinator(data: Path, port: int, clock_file: Path) -> Proc:
    return Proc(
        [sys.executable, "-m", "tests.support.clocked_coordinator",
         "--clock-offset-file", str(clock_file), "--",
         "dev", "--data", str(data), "--listen", f"127.0.0.1:{port}"],
        data.parent / f"{data.name}.log",
    )  # fmt: skip


def pinned(state: Path, name: str) -> set[str]:
    path = state / name
    return set(json.loads(path.read_text())) if path.exists() else set()


async def test_a_code_issued_before_a_rotation_works_after_the_overlap(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    data = tmp_path / "coordinator"
    clock_file = tmp_path / "coordinator.clock"
    clock_file.write_text("0\n")
    coord = coordinator(data, port, clock_file)
    access = tmp_path / "access"
    access.mkdir()
    state = tmp_path / "db-1"
    marker = access / "alice:shell"
    coord.start()
    host = None
    try:
        await wait_healthy(address)
        await wait_for(lambda: (data / "dev.env").exists(), 20, "dev.env")
        env = read_env(data / "dev.env")
        admin_env = {"JITMESH_COORDINATOR": address, "JITMESH_TOKEN": env["JITMESH_TOKEN_ADMIN"]}
        host = agent(address, "db-1", "env=prod", env["JITMESH_JOIN_TOKEN"], state, access)
        host.start()
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ADMIN"]) as admin:
            await wait_connected(admin, "db-1")
        (issued,) = await jitctl_json(
            admin_env,
            "breakglass", "issue", "--agent", "db-1", "--action", "shell", "--subject", "alice",
            "--duration", "10m", "--valid-for", "7d", "--reason", "on-call kit",
        )  # fmt: skip
        old_key = breakglass_pb2.BreakglassCode.FromString(unb64(issued["code"])).key_id
        assert pinned(state, "signing_keys.json") == {old_key}

        # The key is rotated out (the coordinator stopped, as the command asks); the agent
        # reconnects within the overlap and pins the new key from a Welcome signed by the old.
        coord.stop()
        rotate = subprocess.run(
            [str(BIN / "jitmesh-coordinator"), "rotate-signing-key", "--data", str(data)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert rotate.returncode == 0, rotate.stderr
        new_key = rotate.stdout.split()[-1]
        coord.start()
        await wait_healthy(address)
        await wait_for(
            lambda: pinned(state, "signing_keys.json") == {old_key, new_key}, 30, "the new key"
        )
        assert pinned(state, "breakglass_keys.json") == {old_key}

        # More than the overlap passes for the coordinator: the agent's next Welcome no longer
        # lists the old key for commands, and keeps announcing it for the code.
        coord.stop()
        clock_file.write_text(f"{ROTATION_OVERLAP.total_seconds() + 3600:.0f}\n")
        coord.start()
        await wait_healthy(address)
        await wait_for(
            lambda: pinned(state, "signing_keys.json") == {new_key}, 30, "the old key's end"
        )
        assert pinned(state, "breakglass_keys.json") == {old_key}

        # Cut off, the host honours the code signed by the retired key.
        coord.stop()
        used = present(state, issued["code"])
        assert used.returncode == 0, used.stderr
        grant_id = f"bg-{issued['id']}"
        assert f"grant_id={grant_id}" in used.stdout
        assert marker.exists()

        # Back: the coordinator verifies the code under its retired key, adopts and audits it.
        coord.start()
        await wait_healthy(address)
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ADMIN"]) as admin:
            await wait_connected(admin, "db-1")

            async def adopted() -> bool:
                events = await admin.list_audit(grant_id=grant_id)
                return any(e.kind == "breakglass.used" for e in events)

            async with asyncio.timeout(20):
                while not await adopted():
                    await asyncio.sleep(0.05)
            refused = await admin.list_audit(kind="breakglass.refused")
            assert refused == []
            grant = await admin.get_grant(grant_id)
            assert grant.breakglass_code_id == issued["id"]
        listed = await jitctl_json(admin_env, "breakglass", "list", "--unreviewed")
        assert [(c["id"], c["state"]) for c in listed] == [(issued["id"], "used")]
    finally:
        if host is not None:
            host.stop()
        coord.stop()
