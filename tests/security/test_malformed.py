"""Malformed messages (issue 10, item 5): bytes that are not the method's protobuf message get
INVALID_ARGUMENT, never UNKNOWN with Python class names, and an unauthenticated caller sending
them cannot write a traceback per call to the coordinator's log (one line, rate-limited).

The client is gRPC with raw bytes (no generated stubs): what an independent or hostile client
sends."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from server.app import build
from server.config import CoordinatorConfig

GARBAGE = b"\xff\xff\xff\x0f not protobuf"
# Field 1 (the id, a string) announcing 16 bytes and carrying 3: a truncated message.
TRUNCATED = b"\x0a\x10abc"


async def test_garbage_gets_invalid_argument_and_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator = await build(CoordinatorConfig(data_dir=tmp_path / "c", port=0))
    try:
        with caplog.at_level(logging.INFO):
            async with grpc.aio.insecure_channel(coordinator.address) as channel:
                for _ in range(20):
                    for body in (GARBAGE, TRUNCATED):
                        with pytest.raises(grpc.aio.AioRpcError) as unary:
                            await channel.unary_unary("/jitmesh.v1.Access/GetRequest", None, None)(
                                body, timeout=5
                            )
                        assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                        assert "not a valid GetRequest message" in (unary.value.details() or "")
                        assert "class" not in (unary.value.details() or "")
                with pytest.raises(grpc.aio.AioRpcError) as stream:
                    async for _ in channel.unary_stream("/jitmesh.v1.Audit/TailEvents", None, None)(
                        GARBAGE, timeout=5
                    ):
                        pass
                assert stream.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await coordinator.stop()
    lines = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert not any(r.exc_info for r in caplog.records)
    assert not any("Traceback" in r.getMessage() for r in caplog.records)
