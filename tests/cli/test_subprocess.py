"""The installed `jitctl` console script, as a separate process."""

from __future__ import annotations

import json
import os
import pty
import queue
import select
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import IO

import pytest

from jitmesh.types import GrantState
from jitmesh.v1 import audit_pb2
from tests.sdk.scripted import (
    TOKEN,
    Scripted,
    ServerThread,
    approved,
    gid,
    make_agent,
    make_event,
    make_grant,
    make_request,
    rid,
)

JITCTL = str(Path(sys.executable).parent / "jitctl")


def _env(target: str) -> dict[str, str]:
    return {**os.environ, "JITMESH_COORDINATOR": target, "JITMESH_TOKEN": TOKEN}


def test_console_script_lists_agents_as_json() -> None:
    model = Scripted()
    model.put(make_agent("web-1"))
    with ServerThread(model) as server:
        result = subprocess.run(
            [JITCTL, "agent", "list", "-o", "json"],
            env=_env(server.target),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {
            "id": "web-1",
            "state": "connected",
            "name": "web-1",
            "connected": True,
            "labels": {"env": "prod", "role": "web"},
            "last_seen_at": "2026-01-01T12:00:00.000Z",
            "enrolled_at": "2025-12-29T12:00:00.000Z",
            "version": "0.1.0",
            "last_acked_seq": 7,
            "last_seq": 7,
            "active_grants": 1,
            "replica": "",
            "compatibility": "",
        }
    ]
    assert result.stderr == ""


def test_console_script_usage_error_is_one_line() -> None:
    result = subprocess.run(
        [JITCTL, "request", "create", "--agent", "web-1", "--action", "x", "--duration", "soon"],
        env=_env("127.0.0.1:1"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("jitctl: argument --duration:")
    assert result.stdout == ""


class _Lines:
    """Lines of a child's stdout, read in a thread so the test can wait with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)

    def next(self, timeout: float = 10.0) -> str:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            pytest.fail("jitctl printed nothing in time")


def test_audit_tail_follows_and_resumes_after_the_stream_ends() -> None:
    model = Scripted()
    model.put(make_event(1), make_event(2), make_event(3))
    # The first stream ends (as a recycled connection would) after two events.
    model.tail_break_after = 2
    with ServerThread(model) as server:
        child = subprocess.Popen(
            [JITCTL, "-o", "json", "audit", "tail"],
            env=_env(server.target),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            lines = _Lines(child.stdout)
            seen = [json.loads(lines.next())["seq"] for _ in range(3)]
            assert seen == [1, 2, 3]
            server.run(lambda: model.publish(make_event(4)))
            event = json.loads(lines.next())
            assert (event["seq"], event["state"]) == (4, "recorded")
        finally:
            child.terminate()
            _, err = child.communicate(timeout=10)
    # Resubscribed once, after the last event it had printed: nothing twice, nothing skipped.
    calls = model.calls_to("TailEvents")
    after = [m.after_seq for m in calls if isinstance(m, audit_pb2.TailEventsRequest)]
    assert after == [0, 2]
    assert "Traceback" not in err


def _read_until(fd: int, text: str, seen: bytearray, timeout: float = 30.0) -> str:
    """Read the terminal's side until `text` has been drawn; everything read so far."""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{text!r} never drawn; the terminal's last: {bytes(seen[-400:])!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the other side closed (EIO)
                chunk = b""
            assert chunk, f"terminal closed before {text!r}; its last: {bytes(seen[-400:])!r}"
            seen += chunk
    return seen.decode(errors="replace")


def test_wait_draws_a_spinner_that_says_what_is_left() -> None:
    """On a terminal, `request create --wait` shows a live spinner on stderr that says what it
    waits for: the decision, then the host applying the grant. stdout carries only the result."""
    model = Scripted()
    pending = make_request(101)
    grant = make_grant(101, state=GrantState.PENDING_DELIVERY)
    model.put(replace(grant, state=GrantState.ACTIVE))
    model.watch_script = [
        approved(pending, grant),
        approved(pending, replace(grant, state=GrantState.ACTIVE)),
    ]
    gates = [threading.Event(), threading.Event()]
    model.watch_gates = list(gates)
    primary, secondary = pty.openpty()
    with ServerThread(model) as server:
        proc = subprocess.Popen(
            [JITCTL, "request", "create", "--agent", "web-1", "--action", "deploy",
             "--duration", "15m", "--wait"],
            # A terminal wide enough that the spinner's line is not wrapped.
            env={**_env(server.target), "TERM": "xterm-256color", "COLUMNS": "200"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=secondary,
        )  # fmt: skip
        os.close(secondary)
        try:
            seen = bytearray()
            _read_until(primary, f"waiting for request {rid(101)} to be decided", seen)
            gates[0].set()
            _read_until(primary, f"waiting for agent web-1 to apply grant {gid(101)}", seen)
            gates[1].set()
            assert proc.stdout is not None
            out = proc.stdout.read().decode()
            assert proc.wait(timeout=30) == 0
        finally:
            for gate in gates:
                gate.set()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            os.close(primary)
    # A spinner frame was drawn (rich's "dots"), and none of it reached stdout.
    assert any(frame in seen.decode(errors="replace") for frame in "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")
    assert "\x1b" not in out
    assert out.splitlines()[-1].startswith(f"grant {gid(101)} is active on web-1 until ")


def test_wait_draws_nothing_when_stderr_is_not_a_terminal() -> None:
    model = Scripted()
    pending = make_request(101)
    grant = make_grant(101, state=GrantState.ACTIVE)
    model.put(grant)
    model.watch_script = [approved(pending, grant)]
    with ServerThread(model) as server:
        result = subprocess.run(
            [JITCTL, "request", "create", "--agent", "web-1", "--action", "deploy",
             "--duration", "15m", "--wait"],
            env={**_env(server.target), "TERM": "xterm-256color"},
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
