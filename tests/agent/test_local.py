"""The agent's local socket, in this process: the protocol's edges (bad input, limits, unknown
methods, break-glass without a handler). Real users and exec are in tests/host/test_exec.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.enforcers.base import EnforcerSet
from agent.engine import Engine
from agent.local.peers import Caller
from agent.local.protocol import MAX_LINE, decode, encode
from agent.local.server import LocalServer, Message
from agent.local.sessions import Sessions
from agent.store.sqlite import SqliteLeaseStore
from jitmesh.clock import SystemClock

from .factories import AGENT


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[LocalServer]:
    store = SqliteLeaseStore.open(tmp_path)
    clock = SystemClock()
    engine = Engine(name=AGENT, store=store, enforcers=EnforcerSet([]), clock=clock)
    await engine.start()
    sessions = Sessions(clock=clock, audit=engine.audit, holds_any=engine.holds_any)

    async def breakglass(caller: Caller, request: Message) -> Message:
        return {"ok": True, "who": caller.user, "code": request.get("code")}

    local = LocalServer(
        state_dir=tmp_path, name=AGENT, engine=engine, sessions=sessions, clock=clock,
        breakglass=breakglass,
    )  # fmt: skip
    task = asyncio.create_task(local.run())
    await asyncio.wait_for(local.ready.wait(), 10)
    yield local
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert not local.path.exists()
    store.close()


async def ask(server: LocalServer, raw: bytes) -> Message:
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    writer.write(raw)
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    return decode(line)


async def test_the_caller_is_named_by_the_kernel(server: LocalServer) -> None:
    answer = await ask(server, encode({"method": "check", "action": "deploy"}))
    assert answer == {"ok": True, "allowed": False, "subject": "root"}
    assert await ask(server, encode({"method": "info"})) == {"ok": True, "agent": AGENT}


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (encode({"method": "reboot"}), "unknown method"),
        (encode({"method": "check"}), "action is required"),
        (encode({"method": "check", "action": "x; rm -rf /"}), "action is not valid"),
        (encode({"method": "check", "action": "deploy", "subject": 7}), "must be a string"),
        (encode({"method": "exec", "action": "deploy"}), "command and argc"),
    ],
)
async def test_bad_requests_get_an_error_that_echoes_nothing(
    server: LocalServer, raw: bytes, error: str
) -> None:
    answer = await ask(server, raw)
    assert answer["ok"] is False
    assert error in answer["error"]
    assert "rm -rf" not in answer["error"]


async def test_garbage_and_oversized_lines_are_dropped(server: LocalServer) -> None:
    for raw in (b"not json\n", b"[1, 2]\n", b"x" * (MAX_LINE + 10) + b"\n"):
        reader, writer = await asyncio.open_unix_connection(str(server.path))
        writer.write(raw)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    # Still serving.
    assert (await ask(server, encode({"method": "info"})))["ok"] is True


async def test_breakglass_goes_to_its_handler(server: LocalServer) -> None:
    answer = await ask(server, encode({"method": "breakglass", "code": "abc"}))
    assert answer == {"ok": True, "who": "root", "code": "abc"}


def test_exec_events_carry_typed_details_on_the_wire() -> None:
    from datetime import UTC, datetime

    from agent.domain.leases import EventKind, new_event
    from agent.rpc.convert import event_to_pb

    details = {"run_id": "run-1", "command": "sleep", "argc": "2", "run_as": "alice",
               "pid": "42", "exit_code": "143", "signal": "SIGTERM", "duration_ms": "1500",
               "cause": "revoked", "released": "false"}  # fmt: skip
    event = new_event(EventKind.EXEC_EXITED, at=datetime.now(UTC), details=details)
    record = event_to_pb(event).event.exec
    assert (record.run_id, record.argc, record.pid, record.exit_code) == ("run-1", 2, 42, 143)
    assert (record.signal, record.cause, record.released) == ("SIGTERM", "revoked", False)
    assert record.duration.ToMilliseconds() == 1500
    ended = new_event(
        EventKind.SESSIONS_ENDED, at=datetime.now(UTC),
        details={"user": "alice", "processes": "3", "cause": "expired", "scope": "user"},
    )  # fmt: skip
    sessions = event_to_pb(ended).event.sessions
    assert (sessions.user, sessions.processes, sessions.scope) == ("alice", 3, "user")


async def test_the_breakglass_command_talks_to_the_socket(server: LocalServer) -> None:
    import sys

    agent_bin = str(Path(sys.executable).parent / "jitmesh-agent")
    proc = await asyncio.create_subprocess_exec(
        agent_bin, "breakglass", "--state", str(server.path.parent), "code-123",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert out.decode().split() == ["code=code-123", "who=root"]
