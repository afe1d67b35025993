"""One line per event, and no key is ever dropped: whatever a caller passes in `extra` reaches
the line, after the fixed keys of jitmesh.telemetry in their order; console values that could
forge a second line or a key are quoted."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from jitmesh import logs
from jitmesh import telemetry as t


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    yield out
    root.handlers[:] = handlers
    root.setLevel(level)


def _emit(fmt: str, stream: io.StringIO) -> str:
    logs.setup("debug", fmt, static={t.AGENT: "web-1"}, stream=stream)
    logging.getLogger("jitmesh.test").info(
        "grant applied",
        extra={
            "zeta": 1,
            t.SUBJECT: "alice",
            "widget": {"nested": ["a", "b"]},
            t.GRANT_ID: "grt-1",
            t.PEER: "ipv4:10.0.0.7:5000",
            "note": "two\nlines key=forged",
            "empty": "",
        },
    )
    return stream.getvalue()


def test_json_line_keeps_every_key_in_order(stream: io.StringIO) -> None:
    text = _emit("json", stream)
    assert text.count("\n") == 1
    line = json.loads(text)
    assert list(line) == [
        "ts", "level", "logger", "msg", "agent", "grant_id", "subject", "peer",
        "note", "widget", "zeta",
    ]  # fmt: skip
    assert line["widget"] == {"nested": ["a", "b"]}
    assert line["zeta"] == 1
    assert line["ts"].endswith("Z")
    # Only empty values are left out (a key with nothing to say).
    assert "empty" not in line


def test_console_line_quotes_what_could_forge_a_line_or_a_key(stream: io.StringIO) -> None:
    text = _emit("console", stream)
    assert text.count("\n") == 1
    assert 'msg="grant applied"' in text
    assert "agent=web-1 grant_id=grt-1 subject=alice peer=ipv4:10.0.0.7:5000" in text
    assert 'note="two\\nlines key=forged"' in text
    assert f"widget={json.dumps(json.dumps({'nested': ['a', 'b']}))}" in text
    assert text.rstrip("\n").endswith("zeta=1")
