"""RESOURCE_EXHAUSTED with a retry hint (docs/wire.md, "Pushback"): the SDK waits at least the
hint and tries again, for up to `pushback_wait`; without a hint it raises at once."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from jitmesh import errors
from jitmesh.client import Client
from server.domain.delivery import Pushback
from server.rpc.errors import DETAILS_KEY, pushback_metadata
from tests.sdk.scripted import TOKEN, Scripted

PUSHBACK = Pushback("web-1", 12, 10, timedelta(milliseconds=40))
HINT = pushback_metadata(PUSHBACK)
# The status details carry the same message as the status (grpcio-status checks they agree).
BEHIND = PUSHBACK.message()


async def _create(client: Client) -> None:
    await client.create_request(agent="web-1", action="deploy", duration=timedelta(minutes=5))


async def test_a_hinted_refusal_is_waited_out_and_tried_again(
    model: Scripted, client: Client
) -> None:
    model.fail("CreateRequest", grpc.StatusCode.RESOURCE_EXHAUSTED, BEHIND, trailing=HINT, times=2)
    await _create(client)
    assert len(model.calls_to("CreateRequest")) == 3


async def test_without_waiting_the_refusal_carries_the_hint(model: Scripted, target: str) -> None:
    model.fail("CreateRequest", grpc.StatusCode.RESOURCE_EXHAUSTED, BEHIND, trailing=HINT)
    async with await Client.connect(target, token=TOKEN, pushback_wait=0) as client:
        with pytest.raises(errors.RateLimitedError) as caught:
            await _create(client)
    assert caught.value.retry_after == pytest.approx(0.04)
    assert caught.value.agent == "web-1"
    assert len(model.calls_to("CreateRequest")) == 1


async def test_the_wait_is_bounded(model: Scripted, target: str) -> None:
    model.fail("CreateRequest", grpc.StatusCode.RESOURCE_EXHAUSTED, BEHIND, trailing=HINT)
    async with await Client.connect(target, token=TOKEN, pushback_wait=1.0) as client:
        with pytest.raises(errors.RateLimitedError):
            await _create(client)
    # Each wait is at least the hint (40 ms): no more than 1 s / 40 ms tries after the first.
    # (A wait of 1 s, not less: on a loaded machine one refused call can take a few hundred ms,
    # and the client rightly gives up before a wait that would end past its budget.)
    assert 2 <= len(model.calls_to("CreateRequest")) <= 1 + 1.0 / 0.04


async def test_a_refusal_without_a_hint_is_raised_at_once(model: Scripted, client: Client) -> None:
    model.fail("CreateRequest", grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests")
    with pytest.raises(errors.RateLimitedError) as caught:
        await _create(client)
    assert caught.value.retry_after is None
    assert len(model.calls_to("CreateRequest")) == 1


async def test_a_standard_retry_info_alone_is_a_hint(model: Scripted, target: str) -> None:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.RetryInfo(retry_delay={"seconds": 2, "nanos": 500_000_000}))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="later", details=[info])
    trailing = ((DETAILS_KEY, status.SerializeToString()),)
    model.fail("CreateRequest", grpc.StatusCode.RESOURCE_EXHAUSTED, "later", trailing=trailing)
    async with await Client.connect(target, token=TOKEN, pushback_wait=0) as client:
        with pytest.raises(errors.RateLimitedError) as caught:
            await _create(client)
    assert caught.value.retry_after == pytest.approx(2.5)
    assert caught.value.agent == ""


async def test_pushback_wait_must_not_be_negative(target: str) -> None:
    with pytest.raises(errors.InvalidArgumentError):
        await Client.connect(target, token=TOKEN, pushback_wait=-1)
