"""`jitmesh-coordinator migrate-store` (the installed console script, a real process) moves a
SQLite installation into an empty PostgreSQL store with its audit chain intact, verified after
the move, and refuses a target that already holds data."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from server.domain.audit import verify_chain
from server.domain.models import AuditEntry, Checkpoint, CommandKind, ObservedKind
from server.shared import new_key
from server.signing import SigningKeys
from server.store.postgres import PostgresStore
from server.store.sqlite import SqliteStore
from tests.server.helpers import T0, make_grant, make_request
from tests.support import postgres

COORDINATOR = str(Path(sys.executable).parent / "jitmesh-coordinator")


async def run(*argv: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        COORDINATOR, *argv, env={**os.environ, **env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_an_installation_moves_to_postgresql_with_its_chain_intact(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    SigningKeys.open(data, T0)
    source = await SqliteStore.open(data / "coordinator.db")
    request = make_request(agent="web-1")
    grant = make_grant(request_id=request.id, agent="web-1")
    async with source.transaction() as tx:
        await tx.enroll_agent("web-1", {"env": "prod"}, "cred-hash", T0)
        await tx.upsert_user("alice", ["developers"], T0)
        await tx.insert_token("token-hash", "alice", T0, None, "ci")
        await tx.insert_request(request)
        await tx.insert_grant(grant)
        await tx.append_command("web-1", CommandKind.GRANT, grant.id, T0)
        await tx.insert_policy("version: 1\n", "sha", T0, "admin")
        for i in range(50):
            await tx.audit(
                AuditEntry(ObservedKind("test.event"), "alice", T0, details={"i": str(i)})
            )
    seq, head = await source.audit_head()
    original = await source.get_request(request.id)
    await source.add_checkpoint(Checkpoint(seq, head, T0, "ed25519:k", b"s" * 64))
    await source.close()

    async with postgres.fresh_schema() as dsn:
        env = {"JITMESH_SECRET_KEY": new_key()}
        code, out, err = await run(
            "migrate-store", "--from", f"sqlite:{data / 'coordinator.db'}", "--to", dsn,
            "--data", str(data), env=env,
        )  # fmt: skip
        assert code == 0, err
        assert f"audit chain verified: {seq} events" in out
        target = await PostgresStore.open(dsn, min_size=1, max_size=2)
        try:
            assert await target.audit_head() == (seq, head)
            assert verify_chain(await target.audit_chain(0, 1000)).ok
            assert await target.get_request(request.id) == original
            assert [c.seq for c in await target.commands_after("web-1", 0, 10)] == [1]
            assert (await target.current_policy()) is not None
            principal = await target.principal_for_token("token-hash", T0)
            assert principal is not None
            assert principal.name == "alice"
            assert await target.get_secret("signing_keys.json") is not None
            # The next event continues the moved chain.
            async with target.transaction() as tx:
                event = await tx.audit(AuditEntry(ObservedKind("after.move"), "admin", T0))
            assert event is not None
            assert (event.seq, event.prev_hash) == (seq + 1, head)
        finally:
            await target.close()

        code, _, err = await run(
            "migrate-store", "--from", f"sqlite:{data / 'coordinator.db'}", "--to", dsn, env=env
        )
        assert code == 1
        assert "already holds data" in err
