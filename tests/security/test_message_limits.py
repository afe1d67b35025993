"""Oversized messages on every port: the operator port takes at most 1 MiB per message, the
agent (mTLS) port at most 64 KiB. Bigger messages are refused by gRPC itself, before any handler
parses them, with RESOURCE_EXHAUSTED; other callers stay served."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

import jitmesh
from jitmesh.v1 import access_pb2, agentlink_pb2, policy_pb2
from jitmesh.v1.access_pb2_grpc import AccessStub
from jitmesh.v1.agentlink_pb2_grpc import AgentLinkStub
from jitmesh.v1.policy_pb2_grpc import PolicyStub
from tests.security.test_mtls import Tls, connect_as, read_until_error, serving_tls
from tests.security.test_operator_certificates import issue
from tests.server.helpers import TOKENS, Env, agent_link

KIB = 1024
ALICE = (("authorization", "Bearer jmt_test-alice"),)


@pytest.fixture
async def tls(tmp_path: Path) -> AsyncIterator[Tls]:
    async with serving_tls(tmp_path) as serving:
        yield serving


def create(reason_bytes: int) -> access_pb2.CreateRequestRequest:
    return access_pb2.CreateRequestRequest(
        agent="web-1", action="deploy", duration=Duration(seconds=60), reason="r" * reason_bytes
    )


async def test_the_operator_port_refuses_messages_over_one_mib(tls: Tls) -> None:
    creds = grpc.ssl_channel_credentials(tls.ca_pem)
    async with grpc.aio.secure_channel(tls.address, creds) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as big:
            await AccessStub(ch).CreateRequest(create(1100 * KIB), metadata=ALICE, timeout=10)
        assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (big.value.details() or "")
        # Just under the limit the message reaches the handler, which refuses the reason.
        with pytest.raises(grpc.aio.AioRpcError) as long:
            await AccessStub(ch).CreateRequest(create(1000 * KIB), metadata=ALICE, timeout=10)
        assert long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as policy:
            await PolicyStub(ch).ApplyPolicy(
                policy_pb2.ApplyPolicyRequest(yaml="#" * (2048 * KIB)),
                metadata=(("authorization", "Bearer jmt_test-admin"),),
                timeout=10,
            )
        assert policy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The same connection, and every other caller, are still served.
        assert (
            await AccessStub(ch).ListRequests(
                access_pb2.ListRequestsRequest(), metadata=ALICE, timeout=10
            )
            == access_pb2.ListRequestsResponse()
        )
    assert await tls.admin.list_agents() == []


async def test_the_agent_port_refuses_messages_over_64_kib(tls: Tls) -> None:
    steady_key, steady_cert = await tls.enroll("db-1")
    key, cert = await tls.enroll("web-1")
    steady_creds = grpc.ssl_channel_credentials(tls.ca_pem, steady_key, steady_cert)
    async with grpc.aio.secure_channel(tls.agent_address, steady_creds) as steady_ch:
        steady = AgentLinkStub(steady_ch).Connect(None)
        await steady.write(
            agentlink_pb2.AgentMessage(
                hello=agentlink_pb2.Hello(agent="db-1", version=jitmesh.__version__)
            )
        )
        welcome = await steady.read()
        assert isinstance(welcome, agentlink_pb2.CoordinatorMessage)
        assert welcome.HasField("welcome")
        creds = grpc.ssl_channel_credentials(tls.ca_pem, key, cert)
        async with grpc.aio.secure_channel(tls.agent_address, creds) as ch:
            call = AgentLinkStub(ch).Connect(None, timeout=10)
            await call.write(
                agentlink_pb2.AgentMessage(
                    hello=agentlink_pb2.Hello(agent="web-1", version=jitmesh.__version__)
                )
            )
            first = await call.read()
            assert isinstance(first, agentlink_pb2.CoordinatorMessage)
            event = agentlink_pb2.AgentEvent(
                event_id="evt-big-1", kind="x", details={"k": "v" * (70 * KIB)}
            )
            with contextlib.suppress(grpc.aio.AioRpcError):  # the refusal may beat the write
                await call.write(agentlink_pb2.AgentMessage(event=event))
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await read_until_error(call)
            assert cut.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in (cut.value.details() or "")
            # An operator with a client certificate on this port has the same limit.
            op_key, op_cert, _ = issue(tls, "alice")
        op_creds = grpc.ssl_channel_credentials(tls.ca_pem, op_key, op_cert)
        async with grpc.aio.secure_channel(tls.agent_address, op_creds) as op_ch:
            with pytest.raises(grpc.aio.AioRpcError) as big:
                await AccessStub(op_ch).CreateRequest(create(100 * KIB), timeout=10)
            assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # db-1's stream was never disturbed, and web-1 may connect again.
        assert tls.coordinator.registry.connected("db-1")
        assert await connect_as(tls, key, cert) == grpc.StatusCode.OK
        steady.cancel()
    events = await tls.admin.list_audit(since=None)
    assert not [e for e in events if e.id == "evt-big-1"]


async def test_the_development_port_refuses_agent_messages_over_64_kib_and_all_over_1_mib(
    env: Env,
) -> None:
    """Without TLS one port serves everything: the 1 MiB server limit, and the agent stream's
    own 64 KiB check in its handler."""
    for size, code in (
        (100 * KIB, grpc.StatusCode.INVALID_ARGUMENT),
        (1100 * KIB, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ):
        async with agent_link(env.address, env.credentials["web-1"]) as link:
            await link.hello("web-1")
            await link.send(
                agentlink_pb2.AgentMessage(
                    event=agentlink_pb2.AgentEvent(
                        event_id="evt-big-2", kind="x", details={"k": "v" * size}
                    )
                )
            )
            assert await link.ended() == code
    async with grpc.aio.insecure_channel(env.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as big:
            await AccessStub(ch).CreateRequest(
                create(1100 * KIB),
                metadata=(("authorization", f"Bearer {TOKENS['alice']}"),),
                timeout=10,
            )
        assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await env.alice.list_requests() == []
