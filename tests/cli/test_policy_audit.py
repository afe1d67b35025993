"""jitctl policy ... and audit list/verify."""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path

import pytest

from jitmesh.types import ChainVerification, PolicyDecision
from jitmesh.v1 import audit_pb2
from tests.cli.conftest import Jitctl
from tests.sdk.scripted import NOW, Scripted, gid, make_event


def test_policy_show_prints_the_yaml(jitctl: Jitctl) -> None:
    result = jitctl("policy", "show")
    assert result.code == 0
    first, *rest = result.out.splitlines()
    assert first.startswith("# policy v3 sha256:" + "ab" * 32)
    assert rest == ["rules:", "  - name: deployers"]


def test_policy_show_json(jitctl: Jitctl) -> None:
    body = jitctl("policy", "show", "-o", "json").json()
    assert (body["id"], body["state"], body["version"]) == ("v3", "active", 3)
    assert body["yaml"] == "rules:\n  - name: deployers\n"
    assert body["sha256"] == "ab" * 32


def test_policy_apply_from_a_file(model: Scripted, jitctl: Jitctl, tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("rules: []\n", encoding="utf-8")
    body = jitctl(
        "policy", "apply", "-f", str(path), "--expected-version", "3", "-o", "json"
    ).json()
    assert (body["id"], body["state"]) == ("v4", "active")
    assert model.policy.yaml == "rules: []\n"


def test_policy_apply_from_stdin(
    model: Scripted, jitctl: Jitctl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("rules: [stdin]\n"))
    result = jitctl("policy", "apply", "-f", "-")
    assert result.code == 0
    assert result.out.splitlines()[0].split() == ["FIELD", "VALUE"]
    assert model.policy.yaml == "rules: [stdin]\n"


def test_policy_apply_conflict_and_missing_file(jitctl: Jitctl, tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("rules: []\n", encoding="utf-8")
    stale = jitctl("policy", "apply", "-f", str(path), "--expected-version", "2")
    assert stale.code == 1
    assert stale.error_line() == "jitctl: policy is at version 3, not 2"
    missing = jitctl("policy", "apply", "-f", str(tmp_path / "nope.yaml"))
    assert missing.code == 2
    assert missing.error_line().endswith("nope.yaml: No such file or directory")


def test_policy_test_explains_the_match(model: Scripted, jitctl: Jitctl) -> None:
    result = jitctl(
        "policy",
        "test",
        "--subject",
        "alice",
        "--action",
        "deploy",
        "--agent",
        "web-1",
        "--duration",
        "30m",
        "--group",
        "dev",
    )
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split() == ["FIELD", "VALUE"]
    assert "allowed by rule deployers" in lines[1]
    assert any("rule deployers matched" in line for line in lines)
    assert [line.split(None, 1)[1] for line in lines if line.startswith("TRACE")] == [
        "deployers: matched",
        "admins: subject not in group admins",
    ]
    body = jitctl(
        "policy",
        "test",
        "--subject",
        "alice",
        "--action",
        "deploy",
        "--agent",
        "web-1",
        "-o",
        "json",
    ).json()
    assert (body["id"], body["state"], body["max_duration"]) == ("deployers", "allowed", "1h")


def test_policy_test_says_why_nothing_matched(model: Scripted, jitctl: Jitctl) -> None:
    model.decision = PolicyDecision(
        False,
        "",
        "no rule allows deploy on web-1 for mallory",
        False,
        0,
        (),
        None,
        False,
        ("deployers: mallory is not in group dev",),
    )
    args = ("policy", "test", "--subject", "mallory", "--action", "deploy", "--agent", "web-1")
    body = jitctl(*args, "-o", "json").json()
    assert (body["id"], body["state"]) == ("", "denied")
    table = jitctl(*args).out
    assert "denied" in table
    assert "no rule allows deploy on web-1 for mallory" in table
    assert "deployers: mallory is not in group dev" in table


def test_audit_list_since_a_duration_ago(model: Scripted, jitctl: Jitctl) -> None:
    model.put(*(make_event(n, grant_id=gid(n)) for n in range(1, 4)))
    result = jitctl("audit", "list", "--since", "1h", "--kind", "request.created")
    assert result.code == 0
    header, *rows = result.out.splitlines()
    assert header.split()[:3] == ["SEQ", "TIME", "KIND"]
    assert [row.split()[0] for row in rows] == ["1", "2", "3"]
    sent = model.calls_to("ListEvents")[0]
    assert isinstance(sent, audit_pb2.ListEventsRequest)
    assert sent.since.seconds == int((NOW - timedelta(hours=1)).timestamp())
    assert sent.kind == "request.created"


def test_audit_list_json_since_an_instant(model: Scripted, jitctl: Jitctl) -> None:
    model.put(*(make_event(n) for n in range(1, 4)))
    body = jitctl("audit", "list", "--since", "2026-01-01T12:00:02.000Z", "-o", "json").json()
    assert [(e["seq"], e["state"]) for e in body] == [(2, "recorded"), (3, "recorded")]
    assert body[0]["id"] == make_event(2).id
    assert body[0]["hash"] == make_event(2).hash
    assert body[0]["at"] == "2026-01-01T12:00:02.000Z"


@pytest.mark.parametrize("since", ["yesterday", "2026-01-01T12:00:00"])
def test_audit_list_bad_since_is_a_usage_error(jitctl: Jitctl, since: str) -> None:
    result = jitctl("audit", "list", "--since", since)
    assert result.code == 2
    assert "argument --since" in result.error_line()


def test_audit_verify_ok(jitctl: Jitctl) -> None:
    result = jitctl("audit", "verify", "-o", "json")
    assert result.code == 0
    body = result.json()
    assert (body["id"], body["state"], body["events_checked"]) == ("audit-chain", "ok", 3)


def test_audit_verify_broken_names_the_first_bad_entry(model: Scripted, jitctl: Jitctl) -> None:
    model.verification = ChainVerification(False, 9, 7, "hash does not match", "ee" * 32)
    result = jitctl("audit", "verify")
    assert result.code == 1
    assert result.error_line() == "jitctl: audit chain is broken at seq 7: hash does not match"
    assert "FIRST BAD SEQ" in result.out
    assert jitctl("audit", "verify", "-o", "json").json()["state"] == "broken"
