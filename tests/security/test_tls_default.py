"""No token crosses the network in plain text unless the caller said so (issue 10, item 1).

A plain TCP listener stands where the coordinator would be and records every byte a client sends:
by default the client speaks TLS (the first byte is a TLS handshake record, the token is not in
what arrived); only an explicit `insecure` (argument, flag or JITMESH_INSECURE) sends plain HTTP/2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from jitmesh import Client, DeadlineExceededError, InvalidArgumentError, UnavailableError, tls
from server.ca import InternalCA
from tests.e2e import procs
from tests.e2e.procs import jitctl
from tests.security.test_mtls import serving_tls

CANARY = "jmt_canary-0123456789abcdefTLS"
TLS_HANDSHAKE = 0x16
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


class Listener:
    """A TCP server on loopback that answers nothing and keeps what it received."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.connected = asyncio.Event()
        self.got_bytes = asyncio.Event()
        self.port = 0
        self.handlers: set[asyncio.Task[None]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.connected.set()
        try:
            while chunk := await reader.read(65536):
                if not self.received and chunk.startswith(HTTP2_PREFACE):
                    # Answer as an HTTP/2 server would (empty SETTINGS), so a plain-text client
                    # goes on to send its request headers.
                    writer.write(EMPTY_SETTINGS)
                self.received += chunk
                if self.sent_headers():
                    self.got_bytes.set()
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.close()

    def sent_headers(self) -> bool:
        # TLS: the ClientHello is all there is to see. Plain HTTP/2: wait for a HEADERS frame.
        if self.received[:1] == bytes([TLS_HANDSHAKE]):
            return True
        return CANARY.encode() in self.received

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def listening() -> AsyncIterator[Listener]:
    listener = Listener()
    server = await asyncio.start_server(listener._handle, "127.0.0.1", 0)
    listener.port = server.sockets[0].getsockname()[1]
    async with server:
        try:
            yield listener
        finally:
            for task in listener.handlers:
                task.cancel()
            await asyncio.gather(*listener.handlers)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test session sets JITMESH_INSECURE=1 for its dev coordinators (tests/conftest.py).
    monkeypatch.delenv(tls.ENV_INSECURE, raising=False)
    monkeypatch.delenv(tls.ENV_CA_FILE, raising=False)


async def _call_through(listener: Listener, **connect: object) -> None:
    async with await Client.connect(listener.address, token=CANARY, timeout=1, **connect) as c:  # type: ignore[arg-type]
        # The listener never answers: the call fails (unreachable, or out of time).
        with pytest.raises((UnavailableError, DeadlineExceededError)):
            await c.list_requests()
    async with asyncio.timeout(10):
        await listener.got_bytes.wait()


@pytest.mark.usefixtures("clean_env")
async def test_the_sdk_speaks_tls_by_default_and_the_token_never_arrives_in_clear() -> None:
    async with listening() as listener:
        await _call_through(listener)
    assert listener.received[0] == TLS_HANDSHAKE
    assert CANARY.encode() not in listener.received


@pytest.mark.usefixtures("clean_env")
async def test_plain_text_only_when_asked_and_then_the_listener_sees_the_token() -> None:
    # The control: the listener would see a token sent in plain text.
    async with listening() as listener:
        await _call_through(listener, insecure=True)
    assert CANARY.encode() in listener.received


async def test_an_explicit_argument_beats_the_environment(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(tls.ENV_INSECURE, "1")
    async with listening() as listener:
        await _call_through(listener, insecure=False)
    assert listener.received[0] == TLS_HANDSHAKE
    assert CANARY.encode() not in listener.received
    # And the variable alone does switch to plain text (what dev.env is for).
    async with listening() as listener:
        await _call_through(listener)
    assert CANARY.encode() in listener.received


async def test_jitctl_speaks_tls_by_default(clean_env: None) -> None:
    async with listening() as listener:
        code, _, err = await jitctl(
            "--coordinator",
            listener.address,
            "--timeout",
            "1s",
            "request",
            "list",
            env={"JITMESH_TOKEN": CANARY},
        )
    assert code != 0, err
    assert listener.received[:1] == bytes([TLS_HANDSHAKE])
    assert CANARY.encode() not in listener.received


@pytest.mark.subprocess
async def test_the_agent_speaks_tls_and_its_join_token_never_arrives_in_clear(
    tmp_path: Path, clean_env: None
) -> None:
    # The agent follows the same rule. Told nothing, it refuses to start (it used to connect in
    # plain text, and this listener received the join token); given the coordinator's CA (here
    # through JITMESH_CA_FILE, as a unit file's Environment= would), its first bytes are a TLS
    # ClientHello and the join token is not among them.
    (tmp_path / "ca").mkdir()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(InternalCA.open(tmp_path / "ca", datetime.now(UTC)).ca_pem)
    join = "jmj_canary-0123456789abcdefAGENT"

    async def agent(listener: Listener, **env: str) -> tuple[int | None, bytes]:
        proc = await asyncio.create_subprocess_exec(
            str(procs.BIN / "jitmesh-agent"), "--coordinator", listener.address,
            "--join-token", join, "--name", "web-1", "--state", str(tmp_path / "state"),
            "--enforcer", f"file:{tmp_path / 'access'}",
            env={"PATH": "/usr/bin:/bin", **env},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        exited = asyncio.ensure_future(proc.wait())
        sent = asyncio.ensure_future(listener.got_bytes.wait())
        try:
            async with asyncio.timeout(30):
                await asyncio.wait([exited, sent], return_when=asyncio.FIRST_COMPLETED)
        finally:
            sent.cancel()
            if proc.returncode is None:
                proc.terminate()
            _, err = await proc.communicate()
            await exited
        return proc.returncode, err

    async with listening() as listener:
        code, err = await agent(listener)
    assert code == 2, err
    assert b"--ca-file" in err
    assert b"--insecure" in err
    assert not listener.received
    async with listening() as listener:
        code, err = await agent(listener, JITMESH_CA_FILE=str(ca_file))
    assert listener.received[:1] == bytes([TLS_HANDSHAKE]), err
    assert join.encode() not in listener.received
    assert join.encode() not in err


async def test_the_system_trust_store_is_loaded_explicitly(
    tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gRPC's own fallback is a bundled root list that does not honour SSL_CERT_FILE; the SDK
    # loads the system store itself, so a CA installed there (here: through SSL_CERT_FILE) is
    # trusted without --ca-file.
    async with serving_tls(tmp_path) as serving:
        bundle = tmp_path / "system-bundle.pem"
        bundle.write_bytes(serving.ca_pem)
        monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
        async with await Client.connect(serving.address, token="jmt_test-alice") as client:
            assert await client.list_requests() == []
        # Without it, the coordinator's private CA is not trusted, and the error says what to do.
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
        monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "missing-dir"))
        other = tmp_path / "other.pem"
        (tmp_path / "other-ca").mkdir()
        other.write_bytes(InternalCA.open(tmp_path / "other-ca", datetime.now(UTC)).ca_pem)
        async with await Client.connect(
            serving.address, token="jmt_test-alice", ca_file=other
        ) as client:
            with pytest.raises(UnavailableError) as refused:
                await client.list_requests()
        assert "did not verify" in str(refused.value)
        assert "--ca-file" in str(refused.value)


async def test_plain_text_to_a_tls_coordinator_says_what_to_do(
    tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Item 9: a shell that once sourced dev.env (JITMESH_INSECURE=1) pointed at a TLS
    # coordinator got gRPC's "failed to connect to all addresses; ... Socket closed".
    monkeypatch.setenv(tls.ENV_INSECURE, "1")
    async with (
        serving_tls(tmp_path) as serving,
        await Client.connect(serving.address, token="jmt_test-alice") as client,
    ):
        with pytest.raises(UnavailableError) as refused:
            await client.list_requests()
    said = str(refused.value)
    assert "speaks TLS" in said
    assert f"unset {tls.ENV_INSECURE}" in said
    assert "--ca-file" in said
    assert "Socket closed" not in said
    assert "failed to connect to all addresses" not in said


@pytest.mark.usefixtures("clean_env")
async def test_plain_text_to_a_remote_address_warns_every_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="jitmesh"):
        for _ in range(2):
            client = await Client.connect("192.0.2.7:7443", insecure=True)
            await client.close()
        loopback = await Client.connect("127.0.0.1:7443", insecure=True)
        await loopback.close()
    warnings = [r for r in caplog.records if "not loopback" in r.getMessage()]
    assert len(warnings) == 2
    assert "192.0.2.7:7443" in warnings[0].getMessage()


@pytest.mark.usefixtures("clean_env")
async def test_a_ca_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"cannot read the CA file .*--ca-file"):
        await Client.connect("127.0.0.1:1", ca_file=tmp_path / "nope.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(InvalidArgumentError, match="holds no PEM certificate"):
        await Client.connect("127.0.0.1:1", ca_file=junk)


@pytest.mark.subprocess
async def test_a_shell_that_sourced_dev_env_reaches_the_dev_coordinator(
    tmp_path: Path, clean_env: None
) -> None:
    # dev.env says JITMESH_INSECURE=1, so the quickstart's jitctl calls keep working in plain
    # text on loopback, with nothing else set.
    data = tmp_path / "coordinator"
    proc = procs.coordinator(data, procs.free_port())
    proc.start()
    try:
        await procs.wait_for(lambda: (data / "dev.env").exists(), 20, "dev.env")
        env = procs.read_env(data / "dev.env")
        assert env["JITMESH_INSECURE"] == "1"
        code, _, err = await jitctl(
            "request", "list", env={**env, "JITMESH_TOKEN": env["JITMESH_TOKEN_ALICE"]}
        )
        assert code == 0, err
        assert "warning" not in err
    finally:
        proc.stop()
