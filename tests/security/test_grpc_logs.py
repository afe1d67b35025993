"""gRPC's own log lines (its C core's `I1206 18:25:21.356917 7524 file.cc:123] ...`) stay out of
the programs' output, and the coordinator names the peer of a failed TLS handshake (issue 10,
item 12). Real processes: `jitmesh-coordinator serve` with TLS from its internal CA, `jitctl`
pinning the CA of another coordinator."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from jitmesh import grpclog
from server.ca import InternalCA
from tests.e2e.procs import wait_for

pytestmark = pytest.mark.subprocess

BIN = Path(sys.executable).parent
# A line of gRPC's core: severity, date, time, thread, file:line.
CORE_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\]", re.MULTILINE)


def own_env(**extra: str) -> dict[str, str]:
    """This environment without gRPC's variables (the test process sets none; a developer's
    shell might), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in (grpclog.VERBOSITY, grpclog.TRACE)}
    return {**env, **extra}


async def jitctl(env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "jitctl"), "agent", "list",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_core_lines_stay_out_and_the_coordinator_names_the_peer(tmp_path: Path) -> None:
    data = tmp_path / "data"
    log = tmp_path / "coordinator.log"
    with open(log, "wb") as out:
        coordinator = await asyncio.create_subprocess_exec(
            str(BIN / "jitmesh-coordinator"), "serve", "--data", str(data),
            "--listen", "127.0.0.1:0",
            stdout=out, stderr=asyncio.subprocess.STDOUT, env=own_env(),
        )  # fmt: skip
    try:
        listening = re.compile(r'msg="coordinator listening" .*?address=(\S+)')
        await wait_for(lambda: listening.search(log.read_text()) is not None, 30, "listening")
        match = listening.search(log.read_text())
        assert match is not None
        address = match.group(1)
        # Another coordinator's CA: the server's certificate does not verify.
        (tmp_path / "other").mkdir()
        wrong_ca = InternalCA.open(tmp_path / "other", datetime.now(UTC)).directory / "ca.pem"
        env = own_env(
            JITMESH_COORDINATOR=address,
            JITMESH_TOKEN=(data / "admin.token").read_text().strip(),
            JITMESH_CA_FILE=str(wrong_ca),
        )
        code, err = await jitctl(env)
        assert code != 0
        assert err.strip(), "jitctl said nothing"
        assert not CORE_LINE.search(err), err

        # The coordinator's log names the peer that gave up the handshake, once, as its own
        # structured line; the core's own lines are not there.
        failed = re.compile(
            r'msg="TLS handshake failed" peer=127\.0\.0\.1:\d+ address=(\S+) error=.*Socket closed'
        )
        await wait_for(lambda: failed.search(log.read_text()) is not None, 20, "handshake line")
        line = failed.search(log.read_text())
        assert line is not None
        assert line.group(1) == address

        # A user who asks for the core's lines gets them.
        code, err = await jitctl({**env, grpclog.VERBOSITY: "INFO"})
        assert code != 0
        assert CORE_LINE.search(err), err

        # The agent pinning the wrong CA: its attempts fail (the coordinator logs them), and
        # its own output holds none of the core's lines.
        before = log.read_text().count('msg="TLS handshake failed"')
        agent_out = tmp_path / "agent.log"
        (tmp_path / "access").mkdir()
        with open(agent_out, "wb") as out:
            agent = await asyncio.create_subprocess_exec(
                str(BIN / "jitmesh-agent"), "--coordinator", address, "--name", "web-1",
                "--join-token", "jmj_wrong", "--ca-file", str(wrong_ca),
                "--state", str(tmp_path / "state"), "--enforcer", f"file:{tmp_path / 'access'}",
                "--backoff-base", "0.1", "--backoff-cap", "0.2",
                stdout=out, stderr=asyncio.subprocess.STDOUT, env=own_env(),
            )  # fmt: skip
        try:
            await wait_for(
                lambda: log.read_text().count('msg="TLS handshake failed"') >= before + 2,
                30,
                "the agent's failed handshakes",
            )
        finally:
            agent.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                await agent.wait()
        said = agent_out.read_text()
        assert not CORE_LINE.search(said), said
    finally:
        coordinator.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await coordinator.wait()
    text = log.read_text()
    assert not CORE_LINE.search(text), text
    assert text.count('msg="TLS handshake failed"') >= 2, text


def test_failed_handshakes_are_logged_at_most_ten_a_minute() -> None:
    limit = grpclog._Limit(per_minute=10)
    assert [limit.take(100.0 + i) for i in range(12)] == [0] * 10 + [None, None]
    # A minute after the window opened: the next line says how many were held back.
    assert limit.take(160.0) == 2
    assert limit.take(161.0) == 0


# The core's handshake trace for a server-side handshake that failed (grpcio 1.85, trimmed).
FAILED_HANDSHAKE = """\
I1206 18:25:35.970570    7999 handshaker.cc:80] handshake_manager 0x7feb: adding handshaker \
security [0x7feb] at index 1
I1206 18:25:35.971439    7999 handshaker.cc:155] CallNextHandshakerLocked: error=UNAVAILABLE: \
Handshake read failed (Socket closed)
=== Source Location Trace: ===
src/core/util/status_helper.cc:124
 shutdown=false index=2, args={endpoint=0x7feb, args={grpc.internal.endpoint_local_address=\
ipv4:127.0.0.1:7443, grpc.internal.endpoint_peer_address=ipv4:10.0.0.7:45134, \
grpc.internal.server_credentials=0x5610}, read_buffer.Length()=0, exit_early=0}

I1206 18:25:35.971460    7999 channel_trace.h:396] handshake manager 0x7feb: Failed with error: \
UNAVAILABLE: Handshake read failed (Socket closed)
=== Source Location Trace: ===
src/core/util/status_helper.cc:124
I1206 18:25:36.000000    7999 chttp2_transport.cc:1403] ipv4:127.0.0.1:1: Got goaway [2]
E1206 18:25:36.100000    7999 ssl_utils.cc:490] Handshaker factory creation failed
a line that is not the core's
"""


def test_core_records_become_log_records_and_a_failed_handshake_one_line(
    tmp_path: Path,
) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    core_logger = logging.getLogger(grpclog.CORE_LOGGER)
    core_logger.addHandler(keep)
    core_logger.setLevel(logging.DEBUG)
    handshakes = logging.getLogger("test.handshakes")
    handshakes.addHandler(keep)
    raw = tmp_path / "raw"
    out = os.open(raw, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        core = grpclog.CoreLog(stderr=out, reader=-1, handshakes=handshakes)
        for line in FAILED_HANDSHAKE.splitlines():
            core.line(line)
        core.flush()
    finally:
        os.close(out)
        core_logger.removeHandler(keep)
        core_logger.setLevel(logging.NOTSET)
        handshakes.removeHandler(keep)
    seen = [(r.name, r.levelno, r.getMessage()) for r in records]
    assert seen == [
        ("test.handshakes", logging.WARNING, "TLS handshake failed"),
        ("grpc.core", logging.DEBUG, "ipv4:127.0.0.1:1: Got goaway [2]"),
        ("grpc.core", logging.ERROR, "Handshaker factory creation failed"),
    ]
    failed = vars(records[0])
    assert failed["peer"] == "10.0.0.7:45134"
    assert failed["address"] == "127.0.0.1:7443"
    assert failed["error"] == "UNAVAILABLE: Handshake read failed (Socket closed)"
    assert raw.read_text() == "a line that is not the core's\n"
