"""Mixed versions (docs/wire.md, "Mixed versions"), with the previous release built from this
repository's history (commit 317f3c0, release 0.1) into a temporary directory and run from there
with this environment's libraries:

- the previous release's agent against this coordinator (served one minor version older);
- this agent against the previous release's coordinator (refused, with a clear log line);
- a database made by the previous release's coordinator, opened by this one (migrations add).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from jitmesh import Client, GrantState, __version__

from .procs import (
    BIN,
    Proc,
    agent,
    coordinator,
    free_port,
    jitctl,
    read_env,
    wait_for,
    wait_healthy,
)

pytestmark = pytest.mark.subprocess

PREVIOUS = "317f3c0"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's source tree (agent, server, jitmesh), from git history."""
    tree = tmp_path_factory.mktemp("release-0.1")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", PREVIOUS], capture_output=True, check=False
    )
    if archive.returncode != 0:
        pytest.fail(f"commit {PREVIOUS} is not in this clone: the test needs full git history")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def old(tree: Path, module: str, *argv: str, log: Path) -> Proc:
    """A process of the previous release: its own packages first on the path, run from its
    tree so this checkout's packages are never imported."""
    proc = _TreeProc([sys.executable, "-m", module, *argv], log, tree)
    return proc


class _TreeProc(Proc):
    def __init__(self, argv: list[str], log: Path, tree: Path) -> None:
        super().__init__(argv, log)
        self.tree = tree

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(self.tree)}
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.tree,
                env=env,
            )


async def connected(client: Client, name: str, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while True:
            agents = {a.name: a for a in await client.list_agents()}
            if name in agents and agents[name].connected:
                return
            await asyncio.sleep(0.05)


async def test_the_previous_release_agent_is_served_by_this_coordinator(
    tmp_path: Path, previous: Path
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    data = tmp_path / "coordinator"
    coord = coordinator(data, port)
    access = tmp_path / "access"
    access.mkdir()
    coord.start()
    web: Proc | None = None
    try:
        await wait_healthy(address)
        await wait_for(lambda: (data / "dev.env").exists(), 20, "dev.env")
        env = read_env(data / "dev.env")
        web = old(
            previous, "agent",
            "--coordinator", address, "--name", "web-1", "--label", "env=staging",
            "--join-token", env["JITMESH_JOIN_TOKEN"], "--state", str(tmp_path / "web-1"),
            "--enforcer", f"file:{access}", "--backoff-base", "0.1", "--backoff-cap", "0.5",
            log=tmp_path / "web-1.log",
        )  # fmt: skip
        web.start()
        async with (
            await Client.connect(address, token=env["JITMESH_TOKEN_ALICE"]) as alice,
            await Client.connect(address, token=env["JITMESH_TOKEN_ADMIN"]) as admin,
        ):
            await connected(admin, "web-1")
            served = await admin.get_agent("web-1")
            assert (served.version, served.compatibility) == ("0.1.0", "compat")
            code, out, err = await jitctl(
                "agent", "list", env={**env, "JITMESH_TOKEN": env["JITMESH_TOKEN_ADMIN"]}
            )
            assert code == 0, err
            assert "0.1.0 (compat)" in out
            request, grant = await alice.create_request(
                agent="web-1", action="deploy", duration=timedelta(minutes=10), reason="mixed"
            )
            assert grant is not None
            await alice.wait_for_request(
                request.id, until=lambda r: r.grant_state is GrantState.ACTIVE, timeout=20
            )
            marker = access / "alice:deploy"
            assert marker.exists()

            # A coordinator crash: the old agent resends nothing twice and acks its duplicates
            # the old way (APPLIED "duplicate"), which is never booked as a second application.
            coord.kill()
            coord.start()
            await wait_healthy(address)
            await connected(admin, "web-1")
            revoked = await admin.revoke_grant(grant.id, reason="mixed")
            assert revoked.state in {GrantState.REVOKING, GrantState.REVOKED}
            await wait_for(lambda: not marker.exists(), 20, "the old agent to remove the access")
            async with asyncio.timeout(20):
                while (await admin.get_grant(grant.id)).state is not GrantState.REVOKED:
                    await asyncio.sleep(0.05)
            events = await admin.list_audit(since=None, grant_id=grant.id)
            assert [e.kind for e in events].count("grant.applied") == 1

            # A lock reaches the old agent as revokes only (it cannot read lock commands): its
            # access goes, its stream stays up, and no lock command is in its log.
            request, grant = await alice.create_request(
                agent="web-1", action="deploy", duration=timedelta(minutes=10), reason="lock"
            )
            assert grant is not None
            await wait_for(marker.exists, 20, "the old agent to apply the grant")
            lock, revoked_count, _ = await admin.create_lock(subject="alice", reason="INC-9")
            assert revoked_count == 1
            await wait_for(lambda: not marker.exists(), 20, "the lock's revoke on the old agent")
            await admin.lift_lock(lock.id, reason="done")
            request, grant = await alice.create_request(
                agent="web-1", action="deploy", duration=timedelta(minutes=10), reason="after"
            )
            assert grant is not None
            await wait_for(marker.exists, 20, "the old agent to apply a grant after the lock")
            assert (await admin.get_agent("web-1")).connected
            db = sqlite3.connect(data / "coordinator.db")
            try:
                kinds = [
                    row[0] for row in db.execute("SELECT kind FROM commands WHERE agent = 'web-1'")
                ]
            finally:
                db.close()
            assert "revoke" in kinds
            assert "lock" not in kinds
            assert "unlock" not in kinds
            assert (await admin.verify_audit()).ok
    finally:
        if web is not None:
            web.stop()
        coord.stop()


async def test_this_agent_refuses_the_previous_release_coordinator(
    tmp_path: Path, previous: Path
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    data = tmp_path / "coordinator"
    coord = old(
        previous, "server", "dev", "--data", str(data), "--listen", address,
        log=tmp_path / "coordinator.log",
    )  # fmt: skip
    access = tmp_path / "access"
    access.mkdir()
    coord.start()
    web: Proc | None = None
    try:
        await wait_healthy(address)
        await wait_for(lambda: (data / "dev.env").exists(), 20, "dev.env")
        env = read_env(data / "dev.env")
        web = agent(
            address, "web-1", "env=staging", env["JITMESH_JOIN_TOKEN"], tmp_path / "web-1", access
        )
        web.start()
        log = tmp_path / "web-1.log"
        line = (
            f"coordinator version older than 0.2 is not supported by this agent ({__version__}):"
            " upgrade the coordinator first"
        )
        await wait_for(lambda: log.exists() and line in log.read_text(), 30, "the refusal line")
        # The agent reads no command from it: a grant made meanwhile is never applied.
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ALICE"]) as alice:
            _, grant = await alice.create_request(
                agent="web-1", action="deploy", duration=timedelta(minutes=10), reason="mixed"
            )
            assert grant is not None
        count = log.read_text().count(line)
        await wait_for(lambda: log.read_text().count(line) > count, 30, "another attempt")
        assert not (access / "alice:deploy").exists()
    finally:
        if web is not None:
            web.stop()
        coord.stop()


async def test_databases_made_by_the_previous_release_open_and_keep_their_history(
    tmp_path: Path, previous: Path
) -> None:
    """The previous release's coordinator and agent make their databases (a grant in force);
    this release's coordinator and agent open them (migrations add) and carry on: the grant is
    still in force, and a revoke now ends it on the host."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    data, state = tmp_path / "coordinator", tmp_path / "web-1"
    access = tmp_path / "access"
    access.mkdir()
    coord = old(
        previous, "server", "dev", "--data", str(data), "--listen", address,
        log=tmp_path / "old-coordinator.log",
    )  # fmt: skip
    coord.start()
    web: Proc | None = None
    try:
        await wait_healthy(address)
        await wait_for(lambda: (data / "dev.env").exists(), 20, "dev.env")
        env = read_env(data / "dev.env")
        argv = [
            "--coordinator", address, "--name", "web-1", "--label", "env=staging",
            "--join-token", env["JITMESH_JOIN_TOKEN"], "--state", str(state),
            "--enforcer", f"file:{access}", "--backoff-base", "0.1", "--backoff-cap", "0.5",
        ]  # fmt: skip
        web = old(previous, "agent", *argv, log=tmp_path / "old-web-1.log")
        web.start()
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ALICE"]) as alice:
            await connected(alice, "web-1")
            made, grant = await alice.create_request(
                agent="web-1", action="deploy", duration=timedelta(minutes=10), reason="old"
            )
            assert grant is not None
            await alice.wait_for_request(
                made.id, until=lambda r: r.grant_state is GrantState.ACTIVE, timeout=20
            )
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ADMIN"]) as admin:
            old_events = (await admin.verify_audit()).events_checked
    finally:
        if web is not None:
            web.stop()
        coord.stop()

    coord = coordinator(data, port)
    coord.start()
    web = agent(address, "web-1", "env=staging", env["JITMESH_JOIN_TOKEN"], state, access)
    try:
        await wait_healthy(address)
        web.start()
        async with (
            await Client.connect(address, token=env["JITMESH_TOKEN_ADMIN"]) as admin,
            await Client.connect(address, token=env["JITMESH_TOKEN_ALICE"]) as alice,
        ):
            await connected(admin, "web-1")
            assert (await admin.get_agent("web-1")).version == __version__
            kept = await admin.get_request(made.id)
            assert (kept.subject, kept.action, kept.reason) == ("alice", "deploy", "old")
            assert (await admin.get_grant(grant.id)).state is GrantState.ACTIVE
            assert (access / "alice:deploy").exists()
            await admin.revoke_grant(grant.id, reason="new release")
            await wait_for(
                lambda: not (access / "alice:deploy").exists(), 20, "the access to be removed"
            )
            async with asyncio.timeout(20):
                while (await admin.get_grant(grant.id)).state is not GrantState.REVOKED:
                    await asyncio.sleep(0.05)
            verification = await admin.verify_audit()
            assert verification.ok, verification.problem
            assert verification.events_checked > old_events
            # The previous release's tokens still work, and new requests go on from there.
            again, _ = await alice.create_request(
                agent="web-1", action="restart", duration=timedelta(minutes=5), reason="new"
            )
            assert again.id != made.id
    finally:
        web.stop()
        coord.stop()


def test_the_previous_release_is_what_this_test_builds(previous: Path) -> None:
    text = (previous / "jitmesh" / "__init__.py").read_text()
    assert '__version__ = "0.1.0"' in text
    assert (BIN / "jitmesh-agent").exists()
