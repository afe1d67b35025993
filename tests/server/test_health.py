"""Health tells the truth (issue 10, item 8): the standard health service says NOT_SERVING while
the store does not answer and from the moment shutdown begins, for every service and ""; it
was set to SERVING once at start and never changed."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.app import SERVICES, build
from server.config import CoordinatorConfig

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(response.status)


async def test_not_serving_while_the_store_does_not_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    coordinator = await build(CoordinatorConfig(data_dir=tmp_path / "c", port=0))
    runner = asyncio.create_task(coordinator.run())
    address = coordinator.address
    try:
        assert await _status(address) == SERVING
        healthy_read = coordinator.store.get_meta

        async def broken(key: str) -> str | None:
            raise OSError("disk I/O error")  # what a store on a dead disk raises

        # The store's read fails (a wrapper standing in for an unreachable database).
        monkeypatch.setattr(coordinator.store, "get_meta", broken)
        async with asyncio.timeout(15):
            while await _status(address) != NOT_SERVING:
                await asyncio.sleep(0.05)
        for service in SERVICES:
            assert await _status(address, service) == NOT_SERVING, service
        monkeypatch.setattr(coordinator.store, "get_meta", healthy_read)
        async with asyncio.timeout(15):
            while await _status(address) != SERVING:
                await asyncio.sleep(0.05)
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def test_not_serving_from_the_moment_shutdown_begins(tmp_path: Path) -> None:
    coordinator = await build(CoordinatorConfig(data_dir=tmp_path / "c", port=0))
    runner = asyncio.create_task(coordinator.run())
    seen: list[int] = []
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        with contextlib.suppress(grpc.aio.AioRpcError):
            async with asyncio.timeout(15):
                async for item in watch:
                    seen.append(item.status)
                    if len(seen) == 1:
                        runner.cancel()  # shutdown begins once the watch saw SERVING
                    if item.status == NOT_SERVING:
                        break
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    assert seen[0] == SERVING
    assert NOT_SERVING in seen[1:]
