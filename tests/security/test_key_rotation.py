"""Command-signing key rotation: a real agent adopts the new key from a Welcome signed by the key
it pinned, keeps its grants across the reconnect, and ignores keys announced by anyone else."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import SecretStr

from agent import app as agent_app
from agent.config import AgentConfig, FileEnforcerConfig
from jitmesh import Client
from jitmesh.keyset import key_entries, keys_bytes
from jitmesh.v1 import agentlink_pb2, agents_pb2
from server.app import build
from server.config import CoordinatorConfig
from server.domain.models import ADMIN_GROUP, ObservedKind, Principal
from server.domain.policy import DEV_POLICY
from tests.agent.coordinator import grant_body, serving
from tests.agent.factories import T0, gid
from tests.security.test_signed_commands import REJECTED, Host, running

ADMIN = Principal("admin", frozenset({ADMIN_GROUP}))
RETRY = 0.01


async def until(predicate: object, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(RETRY)


@contextlib.asynccontextmanager
async def agent(config: AgentConfig) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(agent_app.run(config, stop=stop))
    try:
        yield
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task


async def test_rotation_reaches_a_running_agent_and_keeps_its_grants(tmp_path: Path) -> None:
    config = CoordinatorConfig(data_dir=tmp_path / "c", port=0, default_policy=DEV_POLICY)
    coordinator = await build(config)
    runner = asyncio.create_task(coordinator.run())
    await coordinator.identity.ensure_user("alice", ["developers"], "jmt_test-alice")
    join, _ = await coordinator.fleet.create_join_token(ADMIN, {"env": "staging"}, None)
    access = tmp_path / "access"
    access.mkdir()
    state = tmp_path / "state"
    agent_config = AgentConfig(
        coordinator=f"127.0.0.1:{coordinator.port}",
        name="web-1",
        join_token=SecretStr(join),
        insecure=True,
        state_dir=state,
        enforcers=(FileEnforcerConfig(directory=access),),
        backoff_base=0.05,
        backoff_cap=0.2,
    )
    alice = await Client.connect(f"127.0.0.1:{coordinator.port}", token="jmt_test-alice")
    try:
        async with agent(agent_config):
            await until(lambda: coordinator.registry.connected("web-1"))
            await alice.create_request(agent="web-1", action="logs", duration=timedelta(hours=1))
            await until(lambda: (access / "alice:logs").exists())
            old = set(json.loads((state / "signing_keys.json").read_text()))

            new = await coordinator.rotate_signing_key()
            await until(lambda: new in json.loads((state / "signing_keys.json").read_text()))
            assert set(json.loads((state / "signing_keys.json").read_text())) == old | {new}
            await until(lambda: coordinator.registry.connected("web-1"))
            # Signed with the new key, applied; the earlier grant never left the host.
            await alice.create_request(agent="web-1", action="deploy", duration=timedelta(hours=1))
            await until(lambda: (access / "alice:deploy").exists())
            assert (access / "alice:logs").exists()
    finally:
        await alice.close()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def test_keys_announced_without_a_pinned_signature_are_ignored(tmp_path: Path) -> None:
    attacker = Ed25519PrivateKey.generate()
    public = attacker.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    announced = [agents_pb2.SigningKey(key_id="attacker", public_key=public)]
    welcome = agentlink_pb2.Welcome(
        signing_keys=announced,
        keys_key_id="attacker",  # not pinned: the agent cannot check it
        keys_signature=attacker.sign(keys_bytes(key_entries(announced))),
    )
    host = Host(tmp_path)
    async with serving() as coordinator:
        coordinator.welcome_extra = welcome
        async with running(host, coordinator):
            session = await coordinator.session()
            body = grant_body(1, gid(), T0, T0 + timedelta(minutes=10))
            data = body.SerializeToString()
            forged = agentlink_pb2.CoordinatorMessage(
                command=agentlink_pb2.Command(
                    seq=1, body=data, key_id="attacker", signature=attacker.sign(data)
                )
            )
            session.send(forged)
            ack = await session.ack()
            assert (ack.status, ack.reason) == (REJECTED, "command is signed by an unknown key")
            assert "attacker" not in json.loads((host.state / "signing_keys.json").read_text())
            assert host.pairs() == set()


def test_rotate_signing_key_command_keeps_the_old_key_for_verification(
    tmp_path: Path,
) -> None:
    from datetime import UTC, datetime

    from server.__main__ import main
    from server.signing import SigningKeys

    now = datetime.now(UTC)
    first = SigningKeys.open(tmp_path, now).public_keys(now)
    assert main(["rotate-signing-key", "--data", str(tmp_path)]) == 0
    keys = SigningKeys.open(tmp_path, now).public_keys(now)
    assert keys[0].key_id == first[0].key_id
    assert len(keys) == 2
    assert keys[0].not_after is not None
    assert keys[1].not_after is None


async def test_checkpoints_signed_by_a_long_retired_key_still_verify(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from server.checkpoints import Checkpoints
    from server.domain.models import AuditEntry
    from server.signing import SigningKeys
    from server.store.sqlite import SqliteStore

    now = datetime.now(UTC)
    keys = SigningKeys.open(tmp_path, now)
    store = await SqliteStore.open(tmp_path / "c.db")
    try:
        async with store.transaction() as tx:
            for _ in range(3):
                await tx.audit(AuditEntry(ObservedKind("test.event"), "alice", now))
        seq, head = await store.audit_head()
        checkpoints = Checkpoints(store, keys)
        await checkpoints.append(now)
        later = now + timedelta(days=30)
        keys.rotate(now + timedelta(days=10))
        keys.rotate(later)
        assert await checkpoints.verified() == ({seq: head}, [])
    finally:
        await store.close()
    assert len(keys.public_keys(later)) == 2  # the first key no longer verifies commands
