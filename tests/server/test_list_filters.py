"""List filters with state numbers this coordinator does not know are bad input, not a crash."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from jitmesh.v1 import access_pb2, access_pb2_grpc, types_pb2
from server.app import build
from server.config import CoordinatorConfig
from server.domain.policy import DEV_POLICY


async def test_unknown_state_numbers_in_filters_are_invalid_arguments(tmp_path: Path) -> None:
    coordinator = await build(
        CoordinatorConfig(data_dir=tmp_path, port=0, default_policy=DEV_POLICY)
    )
    try:
        await coordinator.identity.ensure_user("alice", ["developers"], "jmt_filters")
        metadata = (("authorization", "Bearer jmt_filters"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
            stub = access_pb2_grpc.AccessStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as grants:
                await stub.ListGrants(
                    access_pb2.ListGrantsRequest(states=[types_pb2.GrantState.ValueType(99)]),
                    metadata=metadata,
                )
            with pytest.raises(grpc.aio.AioRpcError) as requests:
                await stub.ListRequests(
                    access_pb2.ListRequestsRequest(states=[types_pb2.RequestState.ValueType(42)]),
                    metadata=metadata,
                )
            # Known states still filter normally.
            ok = await stub.ListGrants(
                access_pb2.ListGrantsRequest(states=[types_pb2.GRANT_STATE_ACTIVE]),
                metadata=metadata,
            )
    finally:
        await coordinator.stop()
    assert grants.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown grant state" in (grants.value.details() or "")
    assert requests.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(ok.grants) == []
