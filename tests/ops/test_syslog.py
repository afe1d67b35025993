"""Logs to syslog: the coordinator told by a flag (`--log-target syslog`) and the agent by its
config file (`log_target = "syslog"`), both real processes, writing to a real unix datagram
socket standing in for the syslog daemon's /dev/log. Each datagram is one line: a priority
(facility daemon, severity from the level), the `ident[pid]: ` tag, then the same structured
line as on stderr."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from jitmesh import logs
from tests.e2e import procs
from tests.e2e.procs import free_port, read_env, wait_for, wait_healthy

LINE = re.compile(r"<(?P<pri>\d+)>(?P<ident>[a-z-]+)\[(?P<pid>\d+)\]: (?P<body>.*)", re.DOTALL)
DAEMON = 3  # facility
INFO = 6  # severity


@contextmanager
def listener(path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


@dataclass(frozen=True)
class Datagram:
    priority: int
    ident: str
    pid: int
    fields: dict[str, Any]


async def datagrams(sock: socket.socket, until: str, timeout: float = 30) -> list[Datagram]:
    """Lines received until one whose msg is `until`, each parsed."""
    loop = asyncio.get_running_loop()
    found: list[Datagram] = []
    async with asyncio.timeout(timeout):
        while True:
            data = await loop.sock_recv(sock, 65536)
            match = LINE.fullmatch(data.decode())
            assert match, data
            line = Datagram(
                int(match["pri"]), match["ident"], int(match["pid"]), json.loads(match["body"])
            )
            found.append(line)
            if line.fields["msg"] == until:
                return found


@pytest.mark.subprocess
async def test_coordinator_and_agent_log_to_a_syslog_socket(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    coordinator = procs.coordinator(
        tmp_path / "coordinator", port, "--log-format", "json", "--log-target", "syslog",
        "--syslog-address", str(tmp_path / "c.sock"),
    )  # fmt: skip
    agent = None
    with listener(tmp_path / "c.sock") as csock, listener(tmp_path / "a.sock") as asock:
        coordinator.start()
        try:
            await wait_healthy(address)
            lines = await datagrams(csock, "coordinator listening")
            listening = lines[-1]
            assert listening.ident == "jitmesh-coordinator"
            assert coordinator.popen is not None
            assert listening.pid == coordinator.popen.pid
            assert listening.priority == DAEMON * 8 + INFO
            assert listening.fields["logger"] == "server.app"
            assert listening.fields["address"] == address
            await wait_for(lambda: (tmp_path / "coordinator" / "dev.env").exists(), 20, "dev.env")
            env = read_env(tmp_path / "coordinator" / "dev.env")

            config = tmp_path / "agent.toml"
            config.write_text(
                'log_format = "json"\nlog_target = "syslog"\n'
                f'syslog_address = "{tmp_path / "a.sock"}"\n'
            )
            access = tmp_path / "access"
            access.mkdir()
            agent = procs.agent(
                address, "web-1", "env=staging", env["JITMESH_JOIN_TOKEN"], tmp_path / "state",
                access, "--config", str(config),
            )  # fmt: skip
            agent.start()
            lines = await datagrams(asock, "connected")
            assert {line.ident for line in lines} == {"jitmesh-agent"}
            started = [line.fields for line in lines if line.fields["msg"] == "agent started"]
            assert started
            assert started[0]["agent"] == "web-1"
        finally:
            if agent is not None:
                agent.stop()
            coordinator.stop()
    # Not on stderr as well: syslog replaces it.
    assert "coordinator listening" not in coordinator.log.read_text()


def test_a_syslog_address_is_a_socket_path_or_host_and_port() -> None:
    with pytest.raises(logs.LogTargetError, match="socket path or HOST:PORT"):
        logs.syslog_handler("localhost", "jitmesh-agent")
