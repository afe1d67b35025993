"""Child processes (a real coordinator, real agents, the baseline's far end) and what /proc
says about them (RSS, CPU time)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def bin_path(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL, and reap."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Child:
    """`argv` in its own process, output to `log`; `env`: more environment variables."""
    out = log.open("ab")
    proc = subprocess.Popen(
        argv,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **env} if env else None,
    )
    out.close()
    return Child(proc, log)


@dataclass
class DevCoordinator:
    """`jitmesh-coordinator dev` in its own process, with its dev.env read back."""

    data: Path
    port: int
    child: Child | None = None
    env: dict[str, str] | None = None
    # More flags for `dev` (--store, --replica, --secret-key-file for replicas).
    extra: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        return [
            bin_path("jitmesh-coordinator"), "dev", "--data", str(self.data),
            "--listen", self.address, "--log-level", "WARNING", "--heartbeat", "30",
            "--keepalive", "60", "--keepalive-timeout", "20", *self.extra,
        ]  # fmt: skip

    async def start(self) -> None:
        env_file = self.data / "dev.env"
        with contextlib.suppress(FileNotFoundError):
            env_file.unlink()
        self.child = spawn(self._argv(), self.data.parent / f"{self.data.name}.log")
        started = time.monotonic()
        while not env_file.exists():
            if self.child.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited; see {self.child.log}")
            if time.monotonic() - started > 30:
                raise TimeoutError("coordinator did not start in 30 s")
            await asyncio.sleep(0.02)
        env = {}
        for line in env_file.read_text().splitlines():
            key, _, value = line.partition("=")
            env[key] = value
        self.env = env

    def token(self, user: str) -> str:
        assert self.env is not None
        return self.env[f"JITMESH_TOKEN_{user.upper()}"]

    @property
    def join_token(self) -> str:
        assert self.env is not None
        return self.env["JITMESH_JOIN_TOKEN"]

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def kill(self) -> None:
        assert self.child is not None
        self.child.kill()

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


@dataclass
class TlsCoordinator(DevCoordinator):
    """The same coordinator serving TLS from its internal CA (`bench/tlscoord.py`): operators
    and enrollment on `port`, AgentLink with client certificates on `agent_port`."""

    agent_port: int = 0

    def _argv(self) -> list[str]:
        return [
            sys.executable, "-m", "bench.tlscoord", str(self.data), str(self.port),
            str(self.agent_port),
        ]  # fmt: skip

    @property
    def ca_file(self) -> Path:
        return self.data / "ca" / "ca.pem"
