"""jitctl request ...: JSON shape, tables, and --wait outcomes."""

from __future__ import annotations

import json
from dataclasses import replace

from jitmesh.types import GrantState, RequestState
from tests.cli.conftest import Jitctl
from tests.sdk.scripted import Scripted, approved, gid, make_grant, make_request, rid

CREATE = ("request", "create", "--agent", "web-1", "--action", "deploy", "--duration", "15m")
# The scripted coordinator numbers new requests from 101.
NEW = 101


def test_create_prints_the_request_as_json(jitctl: Jitctl) -> None:
    result = jitctl("-o", "json", *CREATE, "--reason", "release 42")
    assert result.code == 0, result.err
    body = result.json()
    assert body["id"] == rid(NEW)
    assert body["state"] == "PENDING"
    assert (body["agent"], body["subject"], body["action"]) == ("web-1", "alice", "deploy")
    assert body["duration"] == "15m"
    assert body["duration_seconds"] == 900
    assert body["created_at"] == "2026-01-01T12:00:00.000Z"
    assert body["grant_id"] is None
    assert "grant" not in body
    assert result.err == ""


def test_create_approved_at_once_carries_the_grant(model: Scripted, jitctl: Jitctl) -> None:
    model.auto_approve = True
    body = jitctl(*CREATE, "-o", "json").json()
    assert body["state"] == "APPROVED"
    assert body["grant_id"] == gid(NEW)
    grant = body["grant"]
    assert grant["id"] == gid(NEW)
    assert grant["state"] == "PENDING_DELIVERY"
    assert (grant["agent"], grant["subject"], grant["action"]) == ("web-1", "alice", "deploy")
    assert grant["expires_at"] == "2026-01-01T12:15:00.000Z"
    assert grant["offline"] == {"mode": "REVOKE_AFTER", "grace": "5m", "grace_seconds": 300}


def test_create_table_shows_fields_under_a_header(model: Scripted, jitctl: Jitctl) -> None:
    model.auto_approve = True
    result = jitctl(*CREATE)
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split() == ["FIELD", "VALUE"]
    assert any(line.split()[:2] == ["ID", rid(NEW)] for line in lines)
    assert any(line.startswith("GRANT") and gid(NEW) in line for line in lines)
    assert any("2026-01-01 12:15:00Z (in 15m)" in line for line in lines)


def test_list_follows_pages_and_prints_a_table(model: Scripted, jitctl: Jitctl) -> None:
    model.put(*(make_request(n) for n in range(1, 4)))
    result = jitctl("request", "list")
    assert result.code == 0
    header, *rows = result.out.splitlines()
    assert header.split() == [
        "ID",
        "STATE",
        "SUBJECT",
        "AGENT",
        "ACTION",
        "DURATION",
        "CREATED",
        "GRANT",
    ]
    assert [row.split()[0] for row in rows] == [rid(1), rid(2), rid(3)]
    # Columns line up: every row's STATE starts where the header's does.
    column = header.index("STATE")
    assert all(row[column:].startswith("PENDING") for row in rows)


def test_list_filters_and_json(model: Scripted, jitctl: Jitctl) -> None:
    model.put(make_request(1), make_request(2, state=RequestState.DENIED))
    body = jitctl("request", "list", "--state", "denied", "--agent", "web-1", "-o", "json").json()
    assert [(r["id"], r["state"]) for r in body] == [(rid(2), "DENIED")]


def test_show_approve_deny_cancel(model: Scripted, jitctl: Jitctl) -> None:
    model.put(make_request(1), make_request(2), make_request(3))
    assert jitctl("-o", "json", "request", "show", rid(1)).json()["state"] == "PENDING"
    approved_body = jitctl("-o", "json", "request", "approve", rid(1)).json()
    assert approved_body["state"] == "APPROVED"
    assert approved_body["grant"]["state"] == "ACTIVE"
    denied = jitctl("-o", "json", "request", "deny", rid(2), "--reason", "freeze").json()
    assert (denied["state"], denied["decision_reason"]) == ("DENIED", "freeze")
    assert jitctl("-o", "json", "request", "cancel", rid(3)).json()["state"] == "CANCELLED"


def _script_approval(model: Scripted, grant_state: GrantState, failure: str = "") -> None:
    pending = make_request(NEW)
    grant = make_grant(NEW, state=GrantState.PENDING_DELIVERY)
    final = replace(grant, state=grant_state, failure=failure)
    model.put(final)
    model.watch_script = [approved(pending, grant), approved(pending, final)]


def test_wait_until_the_grant_is_active(model: Scripted, jitctl: Jitctl) -> None:
    _script_approval(model, GrantState.ACTIVE)
    result = jitctl(*CREATE, "--wait", "-o", "json")
    assert result.code == 0, result.err
    body = result.json()
    assert body["state"] == "APPROVED"
    assert body["grant_state"] == "ACTIVE"
    assert body["grant"]["id"] == gid(NEW)
    assert body["grant"]["state"] == "ACTIVE"


def test_wait_table_shows_the_request_then_the_active_grant(
    model: Scripted, jitctl: Jitctl
) -> None:
    _script_approval(model, GrantState.ACTIVE)
    result = jitctl(*CREATE, "--wait")
    assert result.code == 0, result.err
    assert rid(NEW) in result.out
    assert result.out.splitlines()[-1] == (
        f"grant {gid(NEW)} is active on web-1 until 2026-01-01 12:15:00Z (in 15m)"
    )


def test_wait_fails_when_the_agent_cannot_apply(model: Scripted, jitctl: Jitctl) -> None:
    _script_approval(model, GrantState.FAILED, failure="hook exited 3")
    result = jitctl(*CREATE, "--wait", "-o", "json")
    assert result.code == 1
    assert json.loads(result.err) == {
        "error": {
            "kind": "failed",
            "exit_code": 1,
            "message": f"grant {gid(NEW)} failed on agent web-1: hook exited 3",
        }
    }
    assert result.json()["grant"]["state"] == "FAILED"


def test_wait_fails_when_denied(model: Scripted, jitctl: Jitctl) -> None:
    pending = make_request(NEW)
    model.watch_script = [
        replace(
            pending, state=RequestState.DENIED, decided_by="bob", decision_reason="code\nfreeze"
        )
    ]
    result = jitctl(*CREATE, "--wait")
    assert result.code == 1
    assert result.error_line() == f"jitctl: request {rid(NEW)} was denied by bob: code freeze"


def test_wait_fails_when_the_request_expires(model: Scripted, jitctl: Jitctl) -> None:
    model.watch_script = [replace(make_request(NEW), state=RequestState.EXPIRED)]
    result = jitctl(*CREATE, "--wait")
    assert result.code == 1
    assert result.error_line() == f"jitctl: request {rid(NEW)} expired before it was approved"


def test_wait_gives_up_after_the_wait_timeout(jitctl: Jitctl) -> None:
    result = jitctl(*CREATE, "--wait", "--wait-timeout", "300ms")
    assert result.code == 7  # timed out
    line = result.error_line()
    assert line.startswith(f"jitctl: gave up waiting for request {rid(NEW)} after 300ms")
    assert line.endswith("(still pending)")
