"""Real coordinator and agent processes for end-to-end tests: started as subprocesses, waited on
by condition (never by sleeping a fixed time), killed with real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

BIN = Path(sys.executable).parent


async def jitctl(*args: str, env: Mapping[str, str]) -> tuple[int, str, str]:
    """Run the installed `jitctl` console script (a real process) with `env` over this process's
    environment; its exit code, standard output and standard error."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "jitctl"),
        *args,
        env={**os.environ, **env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        out[key] = value
    return out


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition until it holds; fail with `what` when `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_healthy(address: str, timeout: float = 60.0) -> None:
    # 60 s bounds a start that never comes: on a loaded machine (load 11-14 on 2 cores) a
    # coordinator's start after a SIGKILL or a key rotation took longer than 20 s.
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(
            health_pb2.HealthCheckRequest(service=""), wait_for_ready=True, timeout=timeout
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING


class Proc:
    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        # Set over this process's environment for the child.
        self.env: dict[str, str] = {}
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
            )

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.popen is not None
        os.kill(self.popen.pid, sig)
        self.popen.wait(timeout=20)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


def coordinator(data: Path, port: int, *extra: str) -> Proc:
    return Proc(
        [str(BIN / "jitmesh-coordinator"), "dev", "--data", str(data),
         "--listen", f"127.0.0.1:{port}", *extra],
        data.parent / f"{data.name}.log",
    )  # fmt: skip


def agent(
    address: str, name: str, label: str, join_token: str, state: Path, access: Path, *extra: str
) -> Proc:
    return Proc(
        [str(BIN / "jitmesh-agent"), "--coordinator", address, "--name", name, "--label", label,
         "--join-token", join_token, "--state", str(state), "--enforcer", f"file:{access}",
         "--backoff-base", "0.1", "--backoff-cap", "0.5", *extra],
        state.parent / f"{name}.log",
    )  # fmt: skip


def check(state: Path, subject: str, action: str) -> int:
    return subprocess.run(
        [str(BIN / "jitmesh-agent"), "check", "--state", str(state), "--subject", subject,
         "--action", action],
        capture_output=True,
        check=False,
        timeout=30,
    ).returncode  # fmt: skip
