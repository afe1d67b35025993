"""Numeric and time fields of operator calls are checked at the edge (issue 9, item E): a value
the store cannot hold is INVALID_ARGUMENT naming the field, never UNKNOWN with a Python error.
Raw gRPC stubs, since the SDK checks its own arguments before sending."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from jitmesh.v1 import (
    access_pb2,
    access_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    locks_pb2,
    locks_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
)
from tests.server.helpers import TOKENS, Env, bearer, channel

U64 = 2**64 - 1

Call = Callable[[grpc.aio.Channel], Awaitable[Any]]


def _audit(ch: grpc.aio.Channel) -> audit_pb2_grpc.AuditStub:
    return audit_pb2_grpc.AuditStub(ch)


async def _tail_first(ch: grpc.aio.Channel, request: audit_pb2.TailEventsRequest) -> Any:
    call = _audit(ch).TailEvents(request, metadata=bearer(TOKENS["admin"]), timeout=10)
    async for item in call:
        return item
    return None


CALLS: dict[str, Call] = {
    "ListEvents after_seq 2^64-1": lambda ch: _audit(ch).ListEvents(
        audit_pb2.ListEventsRequest(after_seq=U64), metadata=bearer(TOKENS["admin"])
    ),
    "ListEvents since with negative nanos": lambda ch: _audit(ch).ListEvents(
        audit_pb2.ListEventsRequest(since=Timestamp(seconds=1, nanos=-1)),
        metadata=bearer(TOKENS["admin"]),
    ),
    "ListEvents since in year 10000": lambda ch: _audit(ch).ListEvents(
        audit_pb2.ListEventsRequest(since=Timestamp(seconds=253_402_300_800)),
        metadata=bearer(TOKENS["admin"]),
    ),
    "ListEvents page_token too large": lambda ch: _audit(ch).ListEvents(
        audit_pb2.ListEventsRequest(page_token="9" * 30), metadata=bearer(TOKENS["admin"])
    ),
    "ListEvents to_seq 2^64-1": lambda ch: _audit(ch).ListEvents(
        audit_pb2.ListEventsRequest(to_seq=U64), metadata=bearer(TOKENS["admin"])
    ),
    "ListGrants page_token too large": lambda ch: access_pb2_grpc.AccessStub(ch).ListGrants(
        access_pb2.ListGrantsRequest(page_token="9" * 30 + ":grt-x"),
        metadata=bearer(TOKENS["admin"]),
    ),
    "ListRequests page_token negative": lambda ch: access_pb2_grpc.AccessStub(ch).ListRequests(
        access_pb2.ListRequestsRequest(page_token="-" + "9" * 30 + ":req-x"),
        metadata=bearer(TOKENS["admin"]),
    ),
    "TailEvents after_seq 2^64-1": lambda ch: _tail_first(
        ch, audit_pb2.TailEventsRequest(after_seq=U64)
    ),
    "ApplyPolicy expected_version 2^64-1": lambda ch: policy_pb2_grpc.PolicyStub(ch).ApplyPolicy(
        policy_pb2.ApplyPolicyRequest(yaml="rules: []\n", expected_version=U64),
        metadata=bearer(TOKENS["admin"]),
    ),
    "CreateRequest duration with nanos of the other sign": lambda ch: access_pb2_grpc.AccessStub(
        ch
    ).CreateRequest(
        access_pb2.CreateRequestRequest(
            agent="web-1", action="deploy", duration=Duration(seconds=60, nanos=-5)
        ),
        metadata=bearer(TOKENS["alice"]),
    ),
    "CreateLock ttl of 10^11 seconds": lambda ch: locks_pb2_grpc.LocksStub(ch).CreateLock(
        locks_pb2.CreateLockRequest(
            target=locks_pb2.LockTarget(subject="alice"),
            reason="x",
            ttl=Duration(seconds=10**11),
        ),
        metadata=bearer(TOKENS["admin"]),
    ),
}


@pytest.mark.parametrize("name", sorted(CALLS))
async def test_out_of_range_numbers_are_invalid_argument(env: Env, name: str) -> None:
    async with channel(env.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await CALLS[name](ch)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    details = raised.value.details() or ""
    assert "Python" not in details
    assert "Error" not in details
