"""A running agent renews its certificate end to end (real coordinator with TLS, real agent, a
9 s certificate lifetime): it renews once two thirds of the lifetime have passed, reconnects with
the new certificate, keeps every grant in force, and its old certificate is refused from then on."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import grpc
from pydantic import SecretStr

from agent import app as agent_app
from agent.config import AgentConfig, FileEnforcerConfig
from agent.identity import IdentityFile
from jitmesh import Client, GrantState
from jitmesh.types import AuditEvent
from tests.security.test_mtls import refused_as, serving_tls

RETRY = 0.02
LIFETIME = timedelta(seconds=9)


async def test_a_running_agent_renews_its_certificate_without_dropping_grants(
    tmp_path: Path,
) -> None:
    async with serving_tls(tmp_path, agent_cert_lifetime=LIFETIME) as tls:
        state, access = tmp_path / "agent", tmp_path / "access"
        access.mkdir()
        ca_file = tmp_path / "ca.pem"
        ca_file.write_bytes(tls.ca_pem)
        config = AgentConfig(
            coordinator=tls.address,
            name="web-1",
            labels={"env": "staging"},
            join_token=SecretStr(await tls.join_token({"env": "staging"})),
            ca_file=ca_file,
            state_dir=state,
            enforcers=(FileEnforcerConfig(directory=access),),
            backoff_base=0.05,
            backoff_cap=0.2,
        )
        identity_file = IdentityFile(state / "tls_identity.json")
        stop = asyncio.Event()
        task = asyncio.create_task(agent_app.run(config, stop=stop))
        try:
            async with asyncio.timeout(15):
                while not tls.coordinator.registry.connected("web-1"):
                    await asyncio.sleep(RETRY)
            enrolled = identity_file.read()
            assert enrolled is not None
            alice = await Client.connect(
                tls.address,
                token="jmt_test-alice",
                credentials=grpc.ssl_channel_credentials(tls.ca_pem),
            )
            async with alice:
                _, grant = await alice.create_request(
                    agent="web-1", action="deploy", duration=timedelta(minutes=5)
                )
            assert grant is not None
            async with asyncio.timeout(10):
                while (await tls.admin.get_grant(grant.id)).state is not GrantState.ACTIVE:
                    await asyncio.sleep(RETRY)
            assert (access / "alice:deploy").exists()

            renewed = await first_renewal(tls.admin)
            # Not before two thirds of the first certificate's life.
            assert renewed.at >= enrolled.renew_at()
            # The first certificate no longer authenticates. UNAUTHENTICATED (not UNAVAILABLE)
            # means TLS still accepted it: refused because it is no longer bound, not expired.
            old = await refused_as(tls, enrolled.key_pem, enrolled.cert_pem)
            assert old == grpc.StatusCode.UNAUTHENTICATED
            # The agent reconnected after the renewal, with the new certificate.
            async with asyncio.timeout(15):
                while not await connected_after(tls.admin, renewed.seq):
                    await asyncio.sleep(RETRY)
            current = identity_file.read()
            assert current is not None
            assert current.cert_pem != enrolled.cert_pem
            assert current.key_pem != enrolled.key_pem

            # The grant applied before the renewal is still in force, on both sides.
            assert (access / "alice:deploy").exists()
            assert (await tls.admin.get_grant(grant.id)).state is GrantState.ACTIVE
            kinds = {e.kind for e in await tls.admin.list_audit(since=None, grant_id=grant.id)}
            # Neither the coordinator (grant.*) nor the agent (agent.grant.*) ended it.
            ended = ("grant.removed", "grant.revoked", "grant.expired", "grant.revoke_failed")
            assert not [k for k in kinds if k.endswith(ended)], kinds
            assert "agent.grant.applied" in kinds or "grant.applied" in kinds, kinds
        finally:
            stop.set()
            async with asyncio.timeout(10):
                await task


async def first_renewal(admin: Client) -> AuditEvent:
    async with asyncio.timeout(20):
        while True:
            found = await admin.list_audit(since=None, kind="agent.certificate_renewed")
            if found:
                return found[0]
            await asyncio.sleep(RETRY)


async def connected_after(admin: Client, seq: int) -> bool:
    events = await admin.list_audit(since=None, kind="agent.connected", agent="web-1")
    return any(e.seq > seq for e in events)
