"""The agent's local socket and `jitmesh-agent exec`, with real users (su), real signals and
real process groups, in a private mount namespace."""

from __future__ import annotations

from pathlib import Path

from tests.host import sandbox


def test_exec_runs_only_under_a_grant_and_ends_with_it(tmp_path: Path) -> None:
    seen = sandbox.run(tmp_path, "local_exec")
    # The socket: a local user may reach it (state directory 0711), asks for themselves only.
    assert seen["mode"] == "0o711"
    assert seen["alice_check_none"] == [1, "not allowed"]
    assert seen["alice_check"][0] == 0
    assert seen["alice_check"][1].startswith("allowed: grant grt-")
    assert seen["alice_names_bob"][0] == 2
    assert "only root may name another subject" in seen["alice_names_bob"][1]
    assert seen["bob_check"] == [1, "not allowed"]
    assert seen["root_names_alice"][0] == 0
    # exec: the command's exit code, as the caller; root runs it as the subject.
    assert seen["exit7"] == [7, "alice"]
    assert seen["root_as_alice"] == [0, "alice"]
    assert seen["bob_exec"][0] == 1
    assert "no grant lets bob do deploy" in seen["bob_exec"][1]
    # A revoke ends a running command: SIGTERM (143) at once ...
    assert seen["revoked_run"][0] == 143
    assert "access ended (revoked)" in seen["revoked_run"][1]
    assert seen["revoked_after_s"] < 5
    # ... and SIGKILL (137) after the agent's grace (1 s) for one that ignores SIGTERM.
    assert seen["killed_run"][0] == 137
    assert 1.0 <= seen["killed_after_s"] < 10
    # --release: the grant ends on the host when the command ends.
    assert seen["release_run"][0] == 0
    assert seen["released_state"] == ["removed", "released"]
    assert seen["after_release_check"] == [1, "not allowed"]
    # Audited through the outbox: start, exit (code, signal, duration, cause), ended sessions.
    events = seen["events"]
    kinds = [kind for kind, _ in events]
    assert kinds.count("exec.started") == kinds.count("exec.exited") == 5
    exits = [details for kind, details in events if kind == "exec.exited"]
    assert [(e["exit_code"], e["cause"], e["signal"]) for e in exits] == [
        ("7", "exited", ""),
        ("0", "exited", ""),
        ("143", "revoked", "SIGTERM"),
        ("137", "revoked", "SIGKILL"),
        ("0", "exited", ""),
    ]
    assert exits[-1]["released"] == "true"
    assert all(int(e["duration_ms"]) >= 0 and e["run_as"] == "alice" for e in exits)
    # Arguments never leave the host (they may hold secrets): the program and the count only.
    assert all("sleep 60" not in str(details) for _, details in events)
    ended = [details for kind, details in events if kind == "sessions.ended"]
    assert [(e["scope"], e["cause"]) for e in ended] == [("exec", "revoked"), ("exec", "revoked")]


def test_exec_request_files_as_the_subject_and_release_ends_the_grant(tmp_path: Path) -> None:
    """Through a real coordinator and jitmesh-agent, with alice's own token."""
    seen = sandbox.run(tmp_path, "exec_request")
    rc, out = seen["run"]
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("jitmesh-agent exec: request req-")
    assert lines[0].endswith(" approved")
    assert "alice" in lines
    assert lines[-1].endswith(" released")
    # Filed as alice (her grant), released on the coordinator when the command ended.
    assert seen["grants"] == [["restart", "RELEASED"]]
    # Never the agent's credentials: without her own, --request refuses.
    assert seen["no_creds"][0] == 2
    assert "needs your own credentials" in seen["no_creds"][1]
    # Without credentials --release ends the grant on the host; the coordinator follows the
    # agent's report of it (RELEASED, where it used to stay ACTIVE until its end).
    rc, out = seen["host_release"]
    assert rc == 0, out
    assert out.endswith("ended on this host")
    assert seen["host_released"] == "RELEASED"
    # A lock on alice ends her running command (its grant revoked by the lock).
    rc, out = seen["locked_run"]
    assert rc == 143, out
    assert "access ended (revoked)" in out


def test_exec_ends_the_command_when_the_grant_expires(tmp_path: Path) -> None:
    seen = sandbox.run(tmp_path, "exec_expiry")
    rc, out = seen["run"]
    assert rc == 143, out
    assert "access ended (expired)" in out
    # Ended by the agent's own expiry, at not_after (SIGTERM at once; the exec client's exit
    # follows): never before it, and not long after.
    assert 0 <= seen["ended_after_s"] < 5
    exited = [e for e in seen["events"] if "exit_code" in e]
    assert [(e["exit_code"], e["cause"], e["signal"]) for e in exited] == [
        ("143", "expired", "SIGTERM")
    ]
    ended = [e for e in seen["events"] if e.get("scope") == "exec"]
    assert [e["cause"] for e in ended] == ["expired"]
