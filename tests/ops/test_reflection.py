"""Server reflection as grpcurl sees it (the real grpcurl binary): listing, describing a service,
a message and a method (grpc/grpc#34743 worked around), and calling a method; and reflection v1
answered as well as v1alpha."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from tests.e2e import procs
from tests.e2e.procs import BIN, free_port, read_env

GRPCURL = str(BIN / "grpcurl")


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    port = free_port()
    proc = procs.coordinator(tmp_path / "data", port)
    proc.start()
    try:
        env_file = tmp_path / "data" / "dev.env"
        address = f"127.0.0.1:{port}"
        asyncio.run(procs.wait_healthy(address))
        # The port serves before dev mode has written its tokens: wait for the file.
        asyncio.run(procs.wait_for(env_file.exists, 30, "dev.env"))
        yield address, read_env(env_file)
    finally:
        proc.stop()


def grpcurl(*argv: str) -> str:
    done = subprocess.run(
        [GRPCURL, "-plaintext", *argv], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.subprocess
def test_grpcurl_lists_describes_and_calls(coordinator: tuple[str, dict[str, str]]) -> None:
    address, env = coordinator
    listed = grpcurl(address, "list").split()
    assert {
        "jitmesh.v1.Access",
        "jitmesh.v1.Mesh",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= set(listed)
    assert "rpc CreateRequest" in grpcurl(address, "describe", "jitmesh.v1.Access")
    method = grpcurl(address, "describe", "jitmesh.v1.Access.CreateRequest")
    assert method.startswith("jitmesh.v1.Access.CreateRequest is a method:")
    assert "returns ( .jitmesh.v1.CreateRequestResponse )" in method
    message = grpcurl(address, "describe", "jitmesh.v1.CreateRequestRequest")
    assert "string agent = 1;" in message
    v1 = grpcurl(address, "describe", "grpc.reflection.v1.ServerReflection")
    assert "stream .grpc.reflection.v1.ServerReflectionRequest" in v1
    admin = f"authorization: Bearer {env['JITMESH_TOKEN_ADMIN']}"
    status = json.loads(grpcurl("-H", admin, "-d", "{}", address, "jitmesh.v1.Mesh/Status"))
    assert int(status["audit_head_seq"]) > 0
    alice = f"authorization: Bearer {env['JITMESH_TOKEN_ALICE']}"
    body = '{"agent": "web-1", "action": "deploy", "duration": "900s", "reason": "INC-1"}'
    refused = subprocess.run(
        [GRPCURL, "-plaintext", "-H", alice, "-d", body, address,
         "jitmesh.v1.Access/CreateRequest"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # A real call answered by the coordinator (no such agent yet): its error, through grpcurl.
    assert refused.returncode != 0
    assert "Code: " in refused.stderr


async def test_reflection_v1_answers_like_v1alpha(tmp_path: Path) -> None:
    port = free_port()
    proc = procs.coordinator(tmp_path / "data", port)
    proc.start()
    try:
        address = f"127.0.0.1:{port}"
        await procs.wait_healthy(address)
        async with grpc.aio.insecure_channel(address) as channel:
            names = {}
            for version in ("v1", "v1alpha"):
                call = channel.stream_stream(
                    f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                    request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                    response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
                )
                request = reflection_pb2.ServerReflectionRequest(list_services="")
                responses = [r async for r in call(iter([request]))]
                names[version] = [s.name for s in responses[0].list_services_response.service]
        assert names["v1"] == names["v1alpha"]
        assert "jitmesh.v1.Mesh" in names["v1"]
    finally:
        proc.stop()
