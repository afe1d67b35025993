"""Secrets never leak, hostile input never lands. A canary token, join token and agent credential
go through the real coordinator (used, misused, reused); then every log line, error message,
audit row and byte of the database files is searched for them. Injection strings go into every
string field of the operator API and are refused without state or files."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from jitmesh import Client, JitmeshError, validation
from jitmesh.v1 import access_pb2, agentlink_pb2, agents_pb2
from jitmesh.v1.access_pb2_grpc import AccessStub
from jitmesh.v1.agents_pb2_grpc import AgentsStub
from tests.server.helpers import ADMIN, TOKENS, Env, agent_link, bearer, channel

CANARY_TOKEN = "jmt_CANARYtoken9f3b2c1d0e"
CANARY_JOIN = "jmj_CANARYjoin7a6b5c4d3e"
MIN = timedelta(minutes=1)

INJECTIONS = [
    "; rm -rf / #",
    "$(touch /tmp/jitmesh-pwned)",
    "`id`",
    "a|b&c>d",
    "../../../../etc/passwd",
    "..",
    "' OR '1'='1'; DROP TABLE grants; --",
    "web\x001",
    "x" * 100_000,
    "naïve\u202eevil",
    "line\nbreak",
]


async def test_a_canary_secret_appears_nowhere(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    coordinator = env.coordinator
    await coordinator.identity.ensure_user("mallory", ["developers"], CANARY_TOKEN)
    await coordinator.fleet.create_join_token(
        ADMIN, {"env": "staging"}, None, max_uses=1, token=CANARY_JOIN
    )
    seen: list[str] = []
    async with await Client.connect(env.address, token=CANARY_TOKEN) as mallory:
        await mallory.create_request(agent="web-1", action="logs", duration=MIN)
    for wrong in (CANARY_TOKEN + "x", CANARY_TOKEN[:-1], CANARY_JOIN):
        async with await Client.connect(env.address, token=wrong) as client:
            with pytest.raises(JitmeshError) as refused:
                await client.list_requests()
            seen.append(str(refused.value))
    async with channel(env.address) as ch:
        stub = AgentsStub(ch)
        enrolled = await stub.Enroll(
            agents_pb2.EnrollRequest(join_token=CANARY_JOIN, name="canary-1")
        )
        credential = enrolled.credential
        for _ in range(2):  # reuse of the spent token, then a token in the name field
            with pytest.raises(grpc.aio.AioRpcError) as reused:
                await stub.Enroll(
                    agents_pb2.EnrollRequest(join_token=CANARY_JOIN, name=CANARY_JOIN.lower())
                )
            seen.append(reused.value.details() or "")
    async with agent_link(env.address, credential) as link:
        await link.hello("canary-1")
    async with agent_link(env.address, credential + "x") as link:
        await link.send(agentlink_pb2.AgentMessage(hello=agentlink_pb2.Hello(agent="canary-1")))
        seen.append(str(await link.ended()))
    await coordinator.stop()  # closes the store: flushes the WAL into the files searched below

    secrets = [CANARY_TOKEN, CANARY_JOIN, credential]
    haystacks = {"logs": caplog.text, "errors": "\n".join(seen)}
    data_dir = coordinator.config.data_dir
    for path in data_dir.rglob("*"):
        if path.is_file() and not path.name.endswith(".env"):
            haystacks[str(path.relative_to(data_dir))] = path.read_bytes().decode("latin-1")
    for where, text in haystacks.items():
        for secret in secrets:
            assert secret not in text, f"a secret leaked into {where}"
    assert any("coordinator.db" in where for where in haystacks)


async def test_injection_strings_are_refused_in_every_operator_field(
    env: Env, tmp_path: Path
) -> None:
    before = await env.admin.list_requests()
    for bad in INJECTIONS:
        attempts = [
            env.alice.create_request(agent=bad, action="logs", duration=MIN),
            env.alice.create_request(agent="web-1", action=bad, duration=MIN),
            env.admin.create_join_token(labels={bad: "v"}),
            env.admin.get_agent(bad),
            env.admin.remove_agent(bad),
        ]
        if not validation.LABEL_VALUE.fullmatch(bad):  # ".." is a harmless label value
            attempts.append(env.admin.create_join_token(labels={"k": bad}))
        if len(bad) > 1000 or "\x00" in bad or "\n" in bad:
            attempts.append(
                env.alice.create_request(agent="web-1", action="logs", duration=MIN, reason=bad)
            )
        for attempt in attempts:
            with pytest.raises(JitmeshError) as refused:
                await attempt
            message = str(refused.value)
            assert len(message) < 300
            if len(bad) > 3:
                assert bad not in message
    assert await env.admin.list_requests() == before
    assert not Path("/tmp/jitmesh-pwned").exists()


async def test_invalid_utf8_on_the_wire_is_refused_without_state(env: Env) -> None:
    before = await env.admin.list_requests()
    # CreateRequestRequest with field 1 (agent) and 2 (action) as raw, invalid UTF-8 bytes.
    raw = b"\x0a\x02\xff\xfe\x12\x03\xc3\x28\x00"
    async with channel(env.address) as ch:
        call = ch.unary_unary(
            "/jitmesh.v1.Access/CreateRequest",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(raw, metadata=bearer(TOKENS["alice"]))
    assert refused.value.code() != grpc.StatusCode.OK
    assert "\ufffd" not in (refused.value.details() or "")
    assert await env.admin.list_requests() == before


async def test_durations_out_of_bounds_are_refused_by_the_server(env: Env) -> None:
    before = await env.admin.list_requests()
    async with channel(env.address) as ch:
        stub = AccessStub(ch)
        for seconds, nanos in ((0, 0), (-60, 0), (0, 1), (315_576_000_000, 0), (10**9, 0)):
            message = access_pb2.CreateRequestRequest(
                agent="web-1", action="logs", duration=Duration(seconds=seconds, nanos=nanos)
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.CreateRequest(message, metadata=bearer(TOKENS["alice"]))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (seconds, nanos)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.CreateRequest(
                access_pb2.CreateRequestRequest(agent="web-1", action="logs"),
                metadata=bearer(TOKENS["alice"]),
            )
        assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await env.admin.list_requests() == before
