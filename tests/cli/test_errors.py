"""Failures: exit codes and exactly one `jitctl: ...` line on stderr, never the token."""

from __future__ import annotations

import socket

import grpc
import pytest

from jitmesh.cli.main import main
from jitmesh.client import Client
from tests.cli.conftest import Jitctl, Result
from tests.sdk.scripted import TOKEN, Scripted, ServerThread, rid


def test_wrong_token_is_one_line_without_the_token(
    jitctl: Jitctl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JITMESH_TOKEN", "wrong-secret-token")
    result = jitctl("request", "list")
    assert result.code == 4
    assert result.error_line() == "jitctl: invalid bearer token"
    assert "wrong-secret-token" not in result.err + result.out


def test_missing_token_hints_where_to_set_it(
    jitctl: Jitctl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JITMESH_TOKEN")
    result = jitctl("grant", "list")
    assert result.code == 4
    assert result.error_line() == (
        "jitctl: invalid bearer token (no token given: use --token or $JITMESH_TOKEN)"
    )


def test_server_echo_of_the_token_is_not_printed(model: Scripted, jitctl: Jitctl) -> None:
    model.fail("ListAgents", grpc.StatusCode.PERMISSION_DENIED, f"{TOKEN} may not list agents")
    result = jitctl("agent", "list")
    assert result.code == 4
    assert TOKEN not in result.err
    assert result.error_line() == "jitctl: [redacted] may not list agents"


def test_not_found(jitctl: Jitctl) -> None:
    result = jitctl("request", "show", rid(42))
    assert result.code == 3
    assert result.error_line() == "jitctl: no such request"
    assert result.out == ""


def test_invalid_name_is_refused_with_the_field_named(model: Scripted, jitctl: Jitctl) -> None:
    result = jitctl("request", "create", "--agent", "Web 1", "--action", "x", "--duration", "5m")
    assert result.code == 2
    assert result.error_line().startswith("jitctl: agent is not valid")
    assert model.calls == []


@pytest.mark.parametrize("duration", ["15", "0s", "-5m", "forever", "400d"])
def test_bad_duration_is_a_usage_error(jitctl: Jitctl, model: Scripted, duration: str) -> None:
    # "=" so that argparse does not take "-5m" for an option.
    result = jitctl(
        "request", "create", "--agent", "web-1", "--action", "deploy", f"--duration={duration}"
    )
    assert result.code == 2
    line = result.error_line()
    assert line.startswith("jitctl: argument --duration: duration must")
    assert line.endswith("(see 'jitctl request create --help')")
    assert model.calls == []


def test_no_command_shows_help(jitctl: Jitctl) -> None:
    # Deliberately changed with the port to click: `jitctl` alone (and a group alone) shows its
    # help and exits 0, like kubectl, instead of a usage error.
    nothing = jitctl()
    assert nothing.code == 0
    assert nothing.out.startswith("Usage: jitctl [OPTIONS] COMMAND")
    assert "request " in nothing.out
    assert "Examples:" in nothing.out
    group = jitctl("grant")
    assert group.code == 0
    assert group.out.startswith("Usage: jitctl grant [OPTIONS] COMMAND")
    assert nothing.err == group.err == ""


def test_unknown_option_or_command_is_a_usage_error(jitctl: Jitctl) -> None:
    unknown = jitctl("grant", "list", "--colour")
    assert unknown.code == 2
    assert unknown.error_line() == (
        "jitctl: no such option --colour (see 'jitctl grant list --help')"
    )
    typo = jitctl("grant", "lst")
    assert typo.code == 2
    assert "no such command 'lst'" in typo.error_line()
    missing = jitctl("request", "create", "--agent", "web-1", "--duration", "5m")
    assert missing.code == 2
    assert missing.error_line() == (
        "jitctl: missing option --action (see 'jitctl request create --help')"
    )


def test_help_exits_zero(jitctl: Jitctl) -> None:
    result = jitctl("request", "create", "--help")
    assert result.code == 0
    assert "--wait-timeout" in result.out


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_unreachable_coordinator(jitctl: Jitctl) -> None:
    target = f"127.0.0.1:{_closed_port()}"
    result = jitctl("--coordinator", target, "agent", "list")
    assert result.code == 6
    assert result.error_line().startswith(f"jitctl: cannot reach the coordinator at {target}")
    assert TOKEN not in result.err


def test_global_options_before_or_after_the_subcommand(
    model: Scripted, jitctl: Jitctl, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = jitctl("-o", "json", "agent", "list")
    after = jitctl("agent", "list", "--output", "json")
    middle = jitctl("agent", "-o", "json", "list")
    assert before.json() == after.json() == middle.json() == []
    # The flag after the subcommand wins over the environment, and over the flag before it.
    monkeypatch.setenv("JITMESH_COORDINATOR", f"127.0.0.1:{_closed_port()}")
    with ServerThread(model) as other:
        result = jitctl(
            "--coordinator",
            "127.0.0.1:1",
            "agent",
            "list",
            "--coordinator",
            other.target,
            "-o",
            "json",
        )
    assert result.code == 0, result.err
    assert result.json() == []


def test_token_flag_overrides_the_environment(
    jitctl: Jitctl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JITMESH_TOKEN", "stale")
    result: Result = jitctl("agent", "list", "--token", TOKEN)
    assert result.code == 0, result.err


def test_main_reads_the_process_arguments(
    coordinator: ServerThread, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        "sys.argv",
        [
            "jitctl",
            "--coordinator",
            coordinator.target,
            "--token",
            TOKEN,
            "audit",
            "verify",
            "-o",
            "json",
        ],
    )
    assert main() == 0
    assert '"audit-chain"' in capsys.readouterr().out


def test_an_unexpected_error_is_still_one_line_without_the_token(
    jitctl: Jitctl, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Client) -> None:
        raise ValueError(f"header value {TOKEN}\nis odd")

    monkeypatch.setattr(Client, "list_agents", broken)
    result = jitctl("agent", "list")
    assert result.code == 1
    assert result.error_line() == (
        "jitctl: unexpected error (ValueError): header value [redacted] is odd"
    )
