"""Credentials the coordinator makes for itself (issue 10, items 3 and I), through the real
processes: `serve` refuses a directory made by `dev` until `retire-dev` has revoked its tokens and
its reusable join token (each audited); the bootstrap admin token expires and is replaced by
`rotate-admin-token`."""

from __future__ import annotations

import asyncio
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jitmesh import AuthenticationError, Client
from jitmesh.v1 import agents_pb2
from jitmesh.v1.agents_pb2_grpc import AgentsStub

from .procs import BIN, Proc, coordinator, free_port, read_env, wait_for, wait_healthy

pytestmark = pytest.mark.subprocess


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "jitmesh-coordinator"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def serve(data: Path, port: int) -> Proc:
    return Proc(
        [str(BIN / "jitmesh-coordinator"), "serve", "--insecure", "--data", str(data),
         "--listen", f"127.0.0.1:{port}"],
        data.parent / f"{data.name}-serve.log",
    )  # fmt: skip


async def _run_dev_once(data: Path) -> dict[str, str]:
    dev = coordinator(data, free_port())
    dev.start()
    try:
        await wait_for(lambda: (data / "dev.env").exists(), 20, "dev.env")
        return read_env(data / "dev.env")
    finally:
        dev.stop()


async def first_answer(address: str, timeout: float = 30.0) -> None:
    """Return at the first moment the port answers a health check: a fresh channel per attempt
    (a channel's reconnect backoff would look long after), each attempt queued while its
    connection is being set up, so the answer comes as soon as the server starts serving."""
    deadline = time.monotonic() + timeout
    while True:
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                response = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=timeout
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
            else:
                assert response.status == health_pb2.HealthCheckResponse.SERVING
                return
        await asyncio.sleep(0.005)


async def test_a_coordinator_that_answers_has_written_its_credentials(tmp_path: Path) -> None:
    """Readiness implies the credential files: dev.env (dev) and admin.token (serve) are complete
    and private the moment the port first answers, not written just after (a race that tests
    reading them right after the health check lost under load)."""
    data = tmp_path / "coordinator"
    port = free_port()
    dev = coordinator(data, port)
    dev.start()
    try:
        await first_answer(f"127.0.0.1:{port}")
        env_file = data / "dev.env"
        assert env_file.exists(), "healthy before dev.env was written"
        env = read_env(env_file)
        assert env["JITMESH_COORDINATOR"] == f"127.0.0.1:{port}"
        for key in ("ALICE", "BOB", "CAROL", "ADMIN"):
            assert env[f"JITMESH_TOKEN_{key}"].startswith("jmt")
        assert env["JITMESH_JOIN_TOKEN"].startswith("jmj")
        assert env_file.stat().st_mode & 0o777 == 0o600
        assert not (data / "dev.tmp").exists()
    finally:
        dev.stop()

    served = tmp_path / "served"
    port = free_port()
    proc = serve(served, port)
    proc.start()
    try:
        await first_answer(f"127.0.0.1:{port}")
        token_file = served / "admin.token"
        assert token_file.exists(), "healthy before admin.token was written"
        assert token_file.read_text().strip().startswith("jmt")
        assert token_file.stat().st_mode & 0o777 == 0o600
    finally:
        proc.stop()


async def test_serve_refuses_a_dev_directory_until_its_credentials_are_retired(
    tmp_path: Path,
) -> None:
    data = tmp_path / "coordinator"
    env = await _run_dev_once(data)

    refused = await asyncio.to_thread(
        run, "serve", "--insecure", "--data", str(data), "--listen", f"127.0.0.1:{free_port()}"
    )
    assert refused.returncode == 1
    message = refused.stderr.strip().splitlines()[-1]
    assert "made by 'jitmesh-coordinator dev'" in message
    assert "ready-made tokens of admin, alice, bob, carol" in message
    assert "reusable join token" in message
    assert f"retire-dev --data {data}" in message
    assert env["JITMESH_TOKEN_ALICE"] not in refused.stderr

    retired = await asyncio.to_thread(run, "retire-dev", "--data", str(data))
    assert retired.returncode == 0, retired.stderr
    assert retired.stdout.count("retired token") == 4
    assert retired.stdout.count("retired reusable join token") == 1
    assert not (data / "dev.env").exists()

    port = free_port()
    proc = serve(data, port)
    proc.start()
    try:
        address = f"127.0.0.1:{port}"
        await wait_healthy(address)
        # Alice's ready-made token is refused; so is the reusable join token.
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ALICE"]) as alice:
            with pytest.raises(AuthenticationError):
                await alice.list_requests()
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as enroll:
                await AgentsStub(channel).Enroll(
                    agents_pb2.EnrollRequest(
                        join_token=env["JITMESH_JOIN_TOKEN"], name="web-9", labels={"env": "prod"}
                    ),
                    timeout=10,
                )
        assert enroll.value.code() == grpc.StatusCode.UNAUTHENTICATED
        admin_token = (data / "admin.token").read_text().strip()
        async with await Client.connect(address, token=admin_token) as admin:
            events = await admin.list_audit(kind="user.token_revoked")
            joins = await admin.list_audit(kind="agent.join_token_revoked")
        assert [e.actor for e in events] == ["retire-dev"] * 4
        assert [e.actor for e in joins] == ["retire-dev"]
    finally:
        proc.stop()


async def test_the_bootstrap_admin_token_expires_and_is_rotated(tmp_path: Path) -> None:
    data = tmp_path / "coordinator"
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = serve(data, port)
    proc.start()
    try:
        await wait_healthy(address)
        first = (data / "admin.token").read_text().strip()
        async with await Client.connect(address, token=first) as admin:
            [info] = await admin.list_tokens("admin")
        assert info.expires_at is not None
        lifetime = info.expires_at - info.created_at
        assert lifetime == timedelta(hours=24)
    finally:
        proc.stop()

    rotated = await asyncio.to_thread(run, "rotate-admin-token", "--data", str(data), "--ttl", "2h")
    assert rotated.returncode == 0, rotated.stderr
    assert info.id in rotated.stdout
    second = (data / "admin.token").read_text().strip()
    assert second != first

    proc = serve(data, port)
    proc.start()
    try:
        await wait_healthy(address)
        async with await Client.connect(address, token=first) as old:
            with pytest.raises(AuthenticationError):
                await old.list_requests()
        async with await Client.connect(address, token=second) as admin:
            tokens = await admin.list_tokens("admin")
            revoked = await admin.list_audit(kind="user.token_revoked")
        live = [t for t in tokens if t.revoked_at is None]
        assert len(live) == 1
        assert live[0].expires_at is not None
        assert live[0].expires_at - datetime.now(UTC) <= timedelta(hours=2)
        assert [(e.actor, e.details["id"]) for e in revoked] == [("rotate-admin-token", info.id)]
    finally:
        proc.stop()
