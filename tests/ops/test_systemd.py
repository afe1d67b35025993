"""systemd: the unit files pass `systemd-analyze verify` without a warning, and the daemons say
READY=1 (coordinator: store open; agent: lease table reconciled), ping the watchdog and say
STOPPING=1 on SIGTERM, to a real notify socket."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jitmesh import sdnotify
from tests.e2e.procs import BIN, free_port, wait_for, wait_healthy

UNITS = Path(__file__).parents[2] / "packaging" / "systemd"


def _installed(tmp_path: Path, name: str) -> Path:
    """The unit as a package would install it, with ExecStart pointing at this checkout's
    console script (verify checks that the program exists)."""
    text = (UNITS / name).read_text().replace("/usr/bin/", f"{BIN}/")
    path = tmp_path / name
    path.write_text(text)
    return path


def _verify(*units: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing (Debian package systemd)"
    return subprocess.run(
        [analyze, "verify", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
    )


def test_units_verify_without_warnings(tmp_path: Path) -> None:
    units = [
        _installed(tmp_path, n) for n in ("jitmesh-coordinator.service", "jitmesh-agent.service")
    ]
    done = _verify(*units)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    for unit in units:
        text = unit.read_text()
        for line in ("Type=notify", "WatchdogSec=", "LimitNOFILE=65536", "StateDirectory=",
                     "ProtectSystem=strict", "NoNewPrivileges=yes"):  # fmt: skip
            assert line in text, (unit.name, line)


def test_agent_enforcer_drop_ins_verify(tmp_path: Path) -> None:
    unit = _installed(tmp_path, "jitmesh-agent.service")
    drop_ins = tmp_path / "jitmesh-agent.service.d"
    drop_ins.mkdir()
    for conf in (UNITS / "agent-enforcers").glob("*.conf"):
        shutil.copy(conf, drop_ins / conf.name)
    assert {p.name for p in drop_ins.iterdir()} >= {"sudo.conf", "group.conf", "ssh.conf"}
    done = _verify(unit)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is a warning on stderr."""
    unit = _installed(tmp_path, "jitmesh-coordinator.service")
    unit.write_text(unit.read_text().replace("ProtectSystem=", "ProtectSystm="))
    assert "Unknown key" in _verify(unit).stderr


class NotifySocket:
    """What systemd listens on: a unix datagram socket named by $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait(self, state: str, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while not any(state in m.split("\n") for m in self.messages):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {state} within {timeout}s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
        return self.messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.close()


def _run(argv: list[str], notify: NotifySocket, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        sdnotify.ENV_SOCKET: str(notify.path),
        # A 400 ms watchdog: pings every 200 ms from the event loop.
        sdnotify.ENV_WATCHDOG_USEC: "400000",
    }
    with log.open("wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes], notify: NotifySocket) -> None:
    proc.send_signal(signal.SIGTERM)
    notify.wait("STOPPING=1")
    assert proc.wait(timeout=30) == 0


@pytest.mark.subprocess
def test_coordinator_ready_watchdog_stopping(tmp_path: Path, notify: NotifySocket) -> None:
    data = tmp_path / "data"
    proc = _run(
        [str(BIN / "jitmesh-coordinator"), "dev", "--data", str(data),
         "--listen", f"127.0.0.1:{free_port()}"],
        notify,
        tmp_path / "coordinator.log",
    )  # fmt: skip
    try:
        messages = notify.wait("READY=1")
        # READY only after the store is open (it exists on disk) and the port listens.
        assert (data / "coordinator.db").exists() or any(data.glob("*.db"))
        ready = next(m for m in messages if "READY=1" in m.split("\n"))
        assert "STATUS=serving on 127.0.0.1:" in ready
        notify.wait("WATCHDOG=1")
        _stop(proc, notify)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.subprocess
def test_agent_ready_after_reconcile_watchdog_stopping(
    tmp_path: Path, notify: NotifySocket
) -> None:
    """READY=1 comes once the lease table is reconciled, before (and without) the coordinator:
    the agent enforces expiry on its own."""
    access = tmp_path / "access"
    access.mkdir()
    proc = _run(
        [str(BIN / "jitmesh-agent"), "--coordinator", f"127.0.0.1:{free_port()}",
         "--name", "web-1", "--join-token", "jmj_x", "--state", str(tmp_path / "state"),
         "--enforcer", f"file:{access}", "--insecure"],
        notify,
        tmp_path / "agent.log",
    )  # fmt: skip
    try:
        notify.wait("READY=1")
        assert (tmp_path / "state").is_dir()
        notify.wait("WATCHDOG=1")
        _stop(proc, notify)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _log_lines(path: Path) -> list[dict[str, object]]:
    """The JSON lines of a daemon's log so far (gRPC C-core's own lines skipped)."""
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def _wait_logged(path: Path, msg: str) -> dict[str, object]:
    """The last line saying `msg`, once there is one."""

    def found() -> list[dict[str, object]]:
        return [line for line in _log_lines(path) if line["msg"] == msg]

    asyncio.run(wait_for(lambda: bool(found()), 30, f"{msg!r} in {path.name}"))
    return found()[-1]


def _reload(proc: subprocess.Popen[bytes], notify: NotifySocket) -> None:
    """SIGHUP, as `systemctl reload` sends it: RELOADING=1, then READY=1 again."""
    notify.messages.clear()
    proc.send_signal(signal.SIGHUP)
    notify.wait("RELOADING=1")
    notify.wait("READY=1")


@pytest.mark.subprocess
def test_coordinator_sighup_rereads_the_log_level(tmp_path: Path, notify: NotifySocket) -> None:
    """`systemctl reload`: the file is read again and its log level applies at once; a file
    that no longer validates changes nothing and the coordinator keeps serving."""
    config = tmp_path / "coordinator.toml"
    config.write_text('log_level = "warning"\nlog_format = "json"\n')
    port = free_port()
    log = tmp_path / "coordinator.log"
    proc = _run(
        [str(BIN / "jitmesh-coordinator"), "dev", "--config", str(config),
         "--data", str(tmp_path / "data"), "--listen", f"127.0.0.1:{port}"],
        notify,
        log,
    )  # fmt: skip
    try:
        notify.wait("READY=1")
        asyncio.run(wait_healthy(f"127.0.0.1:{port}"))
        # At warning, neither the start nor the call above wrote an info or debug line.
        assert not [line for line in _log_lines(log) if line["level"] in ("info", "debug")]

        config.write_text('log_level = "debug"\nlog_format = "json"\n')
        _reload(proc, notify)
        assert _wait_logged(log, "configuration reloaded")["log_level"] == "debug"
        asyncio.run(wait_healthy(f"127.0.0.1:{port}"))
        access = _wait_logged(log, "rpc")  # the access line per RPC, at debug only
        assert access["method"] == "/grpc.health.v1.Health/Check"

        config.write_text('log_level = "loud"\nlog_format = "json"\n')
        _reload(proc, notify)
        refused = _wait_logged(log, "configuration not reloaded")
        assert refused["level"] == "error"
        assert "log level must be one of" in str(refused["error"])
        assert proc.poll() is None
        asyncio.run(wait_healthy(f"127.0.0.1:{port}"))
        _stop(proc, notify)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.subprocess
def test_agent_sighup_rereads_the_log_level(tmp_path: Path, notify: NotifySocket) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('log_level = "warning"\nlog_format = "json"\n')
    access = tmp_path / "access"
    access.mkdir()
    log = tmp_path / "agent.log"
    proc = _run(
        [str(BIN / "jitmesh-agent"), "--config", str(config),
         "--coordinator", f"127.0.0.1:{free_port()}", "--name", "web-1", "--join-token",
         "jmj_x", "--state", str(tmp_path / "state"), "--enforcer", f"file:{access}",
         "--insecure"],
        notify,
        log,
    )  # fmt: skip
    try:
        notify.wait("READY=1")
        # At warning, "agent started" (info) is not written.
        assert not [line for line in _log_lines(log) if line["msg"] == "agent started"]

        config.write_text('log_level = "info"\nlog_format = "json"\n')
        _reload(proc, notify)
        reloaded = _wait_logged(log, "configuration reloaded")
        assert reloaded["log_level"] == "info"
        assert reloaded["agent"] == "web-1"

        config.write_text('log_level = "info"\nlog_format = "json"\nheartbeat = "soon"\n')
        _reload(proc, notify)
        refused = _wait_logged(log, "configuration not reloaded")
        assert refused["level"] == "error"
        assert "heartbeat" in str(refused["error"])
        assert proc.poll() is None
        _stop(proc, notify)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
