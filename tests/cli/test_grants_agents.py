"""jitctl grant ... and agent ...."""

from __future__ import annotations

from jitmesh.types import GrantState
from jitmesh.v1 import access_pb2, agents_pb2, types_pb2
from tests.cli.conftest import Jitctl
from tests.sdk.scripted import TOKEN, Scripted, gid, make_agent, make_grant, rid

GRANT_KEYS = {"id", "state", "agent", "subject", "action", "expires_at"}


def test_grant_list_defaults_to_live_grants(model: Scripted, jitctl: Jitctl) -> None:
    model.put(make_grant(1), make_grant(2, state=GrantState.EXPIRED), make_grant(3))
    body = jitctl("grant", "list", "-o", "json").json()
    assert [g["id"] for g in body] == [gid(1), gid(3)]
    for grant in body:
        assert grant.keys() >= GRANT_KEYS
        assert grant["expires_at"].endswith("Z")
    sent = model.calls_to("ListGrants")[0]
    assert isinstance(sent, access_pb2.ListGrantsRequest)
    assert set(sent.states) == {
        types_pb2.GRANT_STATE_PENDING_DELIVERY,
        types_pb2.GRANT_STATE_ACTIVE,
        types_pb2.GRANT_STATE_REVOKING,
        types_pb2.GRANT_STATE_REVOKE_FAILED,
    }


def test_grant_list_all_and_state(model: Scripted, jitctl: Jitctl) -> None:
    model.put(make_grant(1), make_grant(2, state=GrantState.EXPIRED))
    assert len(jitctl("grant", "list", "--all", "-o", "json").json()) == 2
    expired = jitctl("grant", "list", "--state", "expired", "-o", "json").json()
    assert [g["id"] for g in expired] == [gid(2)]
    conflict = jitctl("grant", "list", "--all", "--state", "active")
    assert conflict.code == 2
    assert "not allowed with argument" in conflict.error_line()


def test_grant_list_table(model: Scripted, jitctl: Jitctl) -> None:
    model.put(make_grant(1))
    header, row = jitctl("grant", "list").out.splitlines()
    assert header.split()[:5] == ["ID", "STATE", "SUBJECT", "AGENT", "ACTION"]
    assert "EXPIRES" in header
    assert "2026-01-01 12:15:00Z (in 15m)" in row
    assert row.split()[-1] == rid(1)


def test_grant_show_revoke_release(model: Scripted, jitctl: Jitctl) -> None:
    model.put(make_grant(1), make_grant(2))
    shown = jitctl("grant", "show", gid(1), "-o", "json").json()
    assert shown.keys() >= GRANT_KEYS
    assert shown["duration"] == "15m"
    revoked = jitctl("grant", "revoke", gid(1), "--reason", "incident", "-o", "json").json()
    assert (revoked["state"], revoked["end_reason"]) == ("REVOKING", "incident")
    released = jitctl("grant", "release", gid(2), "-o", "json").json()
    assert released["state"] == "RELEASED"
    table = jitctl("grant", "show", gid(1)).out
    assert table.splitlines()[0].split() == ["FIELD", "VALUE"]
    assert "END REASON" in table


def test_agent_list(model: Scripted, jitctl: Jitctl) -> None:
    model.put(make_agent("web-1"), make_agent("web-2", connected=False), make_agent("db-1"))
    body = jitctl("agent", "list", "-o", "json").json()
    assert [(a["id"], a["state"]) for a in body] == [
        ("web-1", "connected"),
        ("web-2", "disconnected"),
        ("db-1", "connected"),
    ]
    header, *rows = jitctl("agent", "list").out.splitlines()
    assert header.split()[:2] == ["NAME", "STATE"]
    assert "LAST SEEN" in header
    assert "env=prod,role=web" in rows[0]
    assert "2026-01-01 12:00:00Z (now)" in rows[1]


def test_agent_list_says_which_versions_are_served_in_compat_or_refused(
    model: Scripted, jitctl: Jitctl
) -> None:
    model.put(
        make_agent("web-1", version="0.2.0", compatibility="supported"),
        make_agent("web-2", version="0.1.0", compatibility="compat"),
        make_agent("web-3", version="0.0.4", compatibility="refused"),
    )
    body = jitctl("agent", "list", "-o", "json").json()
    assert [(a["version"], a["compatibility"]) for a in body] == [
        ("0.2.0", "supported"),
        ("0.1.0", "compat"),
        ("0.0.4", "refused"),
    ]
    _, *rows = jitctl("agent", "list").out.splitlines()
    assert "0.2.0 " in rows[0]
    assert "supported" not in rows[0]
    assert "0.1.0 (compat)" in rows[1]
    assert "0.0.4 (refused)" in rows[2]
    assert "0.1.0 (compat)" in jitctl("agent", "show", "web-2").out


def test_agent_show_and_remove(model: Scripted, jitctl: Jitctl) -> None:
    model.put(make_agent("web-1"))
    assert jitctl("agent", "show", "web-1", "-o", "json").json()["state"] == "connected"
    removed = jitctl("agent", "remove", "web-1", "-o", "json").json()
    assert removed == {"id": "web-1", "state": "removed"}
    gone = jitctl("agent", "show", "web-1")
    assert gone.code == 3
    assert gone.error_line() == "jitctl: no such agent"


def test_agent_token_create(model: Scripted, jitctl: Jitctl) -> None:
    result = jitctl(
        "agent",
        "token",
        "create",
        "--label",
        "env=prod",
        "--label",
        "role=web",
        "--ttl",
        "2h",
        "-o",
        "json",
    )
    body = result.json()
    assert (body["id"], body["state"]) == ("join-token", "created")
    assert body["token"] == "join-secret-0123456789"
    assert body["expires_at"] == "2026-01-01T14:00:00.000Z"
    sent = model.calls_to("CreateJoinToken")[0]
    assert isinstance(sent, agents_pb2.CreateJoinTokenRequest)
    assert dict(sent.labels) == {"env": "prod", "role": "web"}
    assert sent.ttl.seconds == 7200
    table = jitctl("agent", "token", "create").out
    assert "join-secret-0123456789" in table
    assert TOKEN not in table


def test_agent_token_bad_label_is_a_usage_error(jitctl: Jitctl) -> None:
    result = jitctl("agent", "token", "create", "--label", "novalue")
    assert result.code == 2
    assert "labels look like KEY=VALUE" in result.error_line()
