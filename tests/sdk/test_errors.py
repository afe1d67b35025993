"""gRPC status codes become the right jitmesh errors, keeping the message and never the token."""

from __future__ import annotations

import asyncio
import socket
from datetime import timedelta

import grpc
import pytest

from jitmesh import errors
from jitmesh.client import Client, error_from_status
from tests.sdk.scripted import TOKEN, Scripted, rid

CASES = [
    (grpc.StatusCode.UNAUTHENTICATED, errors.AuthenticationError),
    (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDeniedError),
    (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgumentError),
    (grpc.StatusCode.OUT_OF_RANGE, errors.InvalidArgumentError),
    (grpc.StatusCode.NOT_FOUND, errors.NotFoundError),
    (grpc.StatusCode.FAILED_PRECONDITION, errors.ConflictError),
    (grpc.StatusCode.ABORTED, errors.ConflictError),
    (grpc.StatusCode.ALREADY_EXISTS, errors.ConflictError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.RateLimitedError),
    (grpc.StatusCode.UNAVAILABLE, errors.UnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceededError),
    (grpc.StatusCode.INTERNAL, errors.InternalError),
    (grpc.StatusCode.UNKNOWN, errors.InternalError),
    (grpc.StatusCode.UNIMPLEMENTED, errors.InternalError),
    (grpc.StatusCode.DATA_LOSS, errors.InternalError),
]


@pytest.mark.parametrize(("code", "expected"), CASES, ids=[c.name for c, _ in CASES])
async def test_server_status_maps_to_error(
    model: Scripted, client: Client, code: grpc.StatusCode, expected: type[errors.JitmeshError]
) -> None:
    model.fail("GetRequest", code, f"request {rid(1)} is\nnot available")
    with pytest.raises(expected) as caught:
        await client.get_request(rid(1))
    error = caught.value
    assert type(error) is expected
    assert error.code == code.name
    assert "\n" not in str(error)
    if code not in (grpc.StatusCode.DEADLINE_EXCEEDED,):
        # The server's message is kept (on one line).
        assert f"request {rid(1)} is not available" in str(error)


async def test_unavailable_names_the_target(model: Scripted, client: Client, target: str) -> None:
    model.fail("ListAgents", grpc.StatusCode.UNAVAILABLE, "shutting down")
    with pytest.raises(errors.UnavailableError, match=f"cannot reach the coordinator at {target}"):
        await client.list_agents()


async def test_token_echoed_by_the_server_is_redacted(model: Scripted, client: Client) -> None:
    model.fail("GetPolicy", grpc.StatusCode.PERMISSION_DENIED, f"token {TOKEN} may not read")
    with pytest.raises(errors.PermissionDeniedError) as caught:
        await client.get_policy()
    assert TOKEN not in str(caught.value)
    assert TOKEN not in repr(caught.value)
    assert "token [redacted] may not read" in str(caught.value)


async def test_wrong_token_is_an_authentication_error_without_the_token(target: str) -> None:
    async with await Client.connect(target, token="wrong-token-value") as client:
        with pytest.raises(errors.AuthenticationError, match="invalid bearer token") as caught:
            await client.list_agents()
    assert "wrong-token-value" not in str(caught.value)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_coordinator_is_unavailable() -> None:
    target = f"127.0.0.1:{_closed_port()}"
    async with await Client.connect(target, token=TOKEN, timeout=5) as client:
        with pytest.raises(errors.UnavailableError) as caught:
            await client.verify_audit()
    message = str(caught.value)
    assert message.startswith(f"cannot reach the coordinator at {target}")
    assert "\n" not in message
    assert TOKEN not in message


async def test_per_call_deadline_is_the_client_timeout(model: Scripted, target: str) -> None:
    model.hang.add("GetRequest")
    model.abandoned = asyncio.Event()
    async with await Client.connect(target, token=TOKEN, timeout=0.2) as client:
        with pytest.raises(errors.DeadlineExceededError, match=r"did not answer within 0\.2s"):
            await client.get_request(rid(1))
    # The deadline travelled to the server, which stopped working on the call.
    await asyncio.wait_for(model.abandoned.wait(), 5)


@pytest.mark.parametrize(("code", "expected"), CASES, ids=[c.name for c, _ in CASES])
def test_error_table_without_details_has_a_message(
    code: grpc.StatusCode, expected: type[errors.JitmeshError]
) -> None:
    error = error_from_status(code, None, target="coord:7443", timeout=3)
    assert isinstance(error, expected)
    assert str(error).strip()
    assert error.code == code.name


def test_error_messages_are_bounded_and_free_of_control_characters() -> None:
    error = error_from_status(
        grpc.StatusCode.INVALID_ARGUMENT, "bad\x1b[31m value " + "x" * 1000, target="t"
    )
    assert "\x1b" not in str(error)
    assert len(str(error)) <= 300
    assert str(error).startswith("bad?[31m value")


async def test_invalid_input_is_refused_before_it_is_sent(model: Scripted, client: Client) -> None:
    with pytest.raises(errors.InvalidArgumentError, match="agent is not valid"):
        await client.create_request(agent="Web 1", action="deploy", duration=timedelta(minutes=5))
    with pytest.raises(errors.InvalidArgumentError, match="duration must be positive"):
        await client.create_request(agent="web-1", action="deploy", duration=timedelta(0))
    with pytest.raises(errors.InvalidArgumentError, match="request id is not valid"):
        await client.get_request("../etc/passwd")
    with pytest.raises(errors.InvalidArgumentError, match="limit must be positive"):
        await client.list_requests(limit=0)
    assert model.calls == []


async def test_token_that_cannot_be_a_header_is_refused_without_echo(target: str) -> None:
    with pytest.raises(errors.InvalidArgumentError) as caught:
        await Client.connect(target, token="abc\ndef")
    assert "abc" not in str(caught.value)
