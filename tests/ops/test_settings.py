"""Daemon settings: a TOML file, then JITMESH_* variables, then flags, each overriding the one
before; --print-config shows the effective values with secrets masked; bad values are one line
naming the setting in all its spellings."""

from __future__ import annotations

import subprocess
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest

from agent import settings as agent_settings
from agent.domain.errors import ConfigError
from server.settings import SettingsError
from server.settings import load as load_coordinator
from tests.e2e.procs import BIN

FILE = """\
listen = "127.0.0.1:7001"
log_level = "debug"
heartbeat = "15s"
keepalive = "1m"
agent_queue_limit = 500
"""


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*argv], capture_output=True, text=True, timeout=60, check=False, env=env)


def test_coordinator_file_then_environment_then_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(FILE)
    monkeypatch.setenv("JITMESH_LOG_LEVEL", "warning")
    monkeypatch.setenv("JITMESH_KEEPALIVE", "2m")
    settings = load_coordinator(config, {"keepalive": "45s", "data": str(tmp_path)})
    assert settings.listen == "127.0.0.1:7001"  # file only
    assert settings.heartbeat == timedelta(seconds=15)  # file, as a duration
    assert settings.agent_queue_limit == 500
    assert settings.log_level == "warning"  # environment over file
    assert settings.keepalive == timedelta(seconds=45)  # flag over environment over file
    assert settings.keepalive_timeout == timedelta(seconds=10)  # default
    monkeypatch.delenv("JITMESH_KEEPALIVE")
    assert load_coordinator(config, {}).keepalive == timedelta(minutes=1)


def test_coordinator_print_config_as_a_process(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(FILE)
    done = _run(
        str(BIN / "jitmesh-coordinator"), "serve", "--data", str(tmp_path / "data"),
        "--config", str(config), "--print-config", "--heartbeat", "20s",
        env={"PATH": "/usr/bin:/bin", "JITMESH_LOG_FORMAT": "json"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = tomllib.loads(done.stdout)
    assert shown["listen"] == "127.0.0.1:7001"
    assert shown["heartbeat"] == "20s"
    assert shown["keepalive"] == "1m"
    assert shown["log_format"] == "json"
    assert not (tmp_path / "data").exists()  # printing starts nothing


@pytest.mark.parametrize(
    ("text", "flags", "message"),
    [
        ("bogus = 1\n", {}, "unknown setting 'bogus'"),
        ('heartbeat = "soon"\n', {}, "--heartbeat: duration must"),
        ("", {"log_level": "loud"}, "--log-level: log level must be one of debug"),
        ("", {"enroll_rate": "0"}, "--enroll-rate: input should be greater than 0"),
        ("listen = 7443\n", {}, "--listen: "),
        ("not toml [", {}, "is not valid TOML"),
    ],
)
def test_coordinator_bad_settings(
    tmp_path: Path, text: str, flags: dict[str, object], message: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(SettingsError) as caught:
        load_coordinator(config, flags)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_coordinator_secret_from_a_file(tmp_path: Path) -> None:
    token = tmp_path / "admin.token"
    token.write_text("")
    done = _run(
        str(BIN / "jitmesh-coordinator"), "serve", "--insecure", "--data", str(tmp_path / "d"),
        "--admin-token-file", str(token),
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == f"jitmesh-coordinator: admin_token_file: {token} is empty"


def test_agent_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'coordinator = "c.example:7443"\nname = "web-1"\nstate = "/var/lib/x"\n'
        'heartbeat = "3s"\nkeepalive = "1m"\nlog_level = "debug"\n'
        '[labels]\nenv = "prod"\n'
    )
    environ = {"JITMESH_KEEPALIVE": "2m", "JITMESH_LOG_LEVEL": "error", "JITMESH_NAME": "web-2"}
    loaded = agent_settings.load(config, {"keepalive": "45s"}, environ)
    values = loaded.values
    assert values["coordinator"] == "c.example:7443"
    assert values["heartbeat"] == 3.0
    assert values["labels"] == {"env": "prod"}
    assert values["name"] == "web-2"
    assert values["log_level"] == "error"
    assert values["keepalive"] == 45.0
    assert values["remove_retries"] == 6


def test_agent_print_config_masks_the_join_token(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    access = tmp_path / "access"
    config.write_text(
        'coordinator = "127.0.0.1:1"\nname = "web-1"\n'
        f'state = "{tmp_path / "state"}"\nreconcile_every = "5m"\n'
        f'[enforcers.file]\ndirectory = "{access}"\n'
    )
    done = _run(
        str(BIN / "jitmesh-agent"), "--config", str(config), "--print-config",
        "--join-token", "jmj_very-secret",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "jmj_very-secret" not in done.stdout
    shown = tomllib.loads(done.stdout)
    assert shown["join_token"] == "********"
    assert shown["reconcile_every"] == "5m"
    assert shown["enforcers"] == {"file": {"directory": str(access)}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 1\n", "unknown setting 'colour'"),
        ('heartbeat = "fast"\n', "heartbeat in"),
        ('log_level = "loud"\n', "log level must be one of"),
        ("remove_retries = 1.5\n", "remove_retries"),
    ],
)
def test_agent_bad_settings(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        agent_settings.load(config, {}, {})
    assert message in str(caught.value)


def test_agent_join_token_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "join.token"
    secret.write_text("jmj_from-file\n")
    loaded = agent_settings.load(None, {"join_token_file": str(secret)}, {})
    assert agent_settings.join_token(loaded) == "jmj_from-file"


def test_the_clients_insecure_variable_does_not_make_serve_plain_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dev.env sets JITMESH_INSECURE=1 for jitctl; a shell that sourced it still starts `serve`
    with TLS (only the flag or the file's `insecure = true` turns TLS off)."""
    monkeypatch.setenv("JITMESH_INSECURE", "1")
    assert load_coordinator(None, {}).insecure is False
    config = tmp_path / "c.toml"
    config.write_text("insecure = true\n")
    assert load_coordinator(config, {}).insecure is True


EXAMPLES = Path(__file__).parents[2] / "examples"


def test_the_example_files_are_valid() -> None:
    from jitmesh import profiles

    coordinator = load_coordinator(EXAMPLES / "coordinator.toml", {})
    assert coordinator.metrics_listen == "127.0.0.1:9464"
    assert coordinator.log_format == "json"
    agent = agent_settings.load(EXAMPLES / "agent.toml", {}, {})
    assert agent.values["labels"] == {"env": "prod", "role": "web"}
    assert set(agent.enforcer_tables) == {"file", "sudo"}
    profile = profiles.load_profile(
        environ={"JITMESH_CONFIG": str(EXAMPLES / "jitctl-config.toml")}
    )
    assert profile is not None
    assert (profile.name, profile.coordinator) == ("prod", "jit.example.com:7443")


@pytest.mark.parametrize("level", ["WARNING", "Warning", "warning"])
def test_both_daemons_take_the_same_log_levels_in_any_case(tmp_path: Path, level: str) -> None:
    coordinator = _run(
        str(BIN / "jitmesh-coordinator"), "serve", "--insecure", "--data", str(tmp_path / "d"),
        "--log-level", level, "--print-config",
    )  # fmt: skip
    agent = _run(
        str(BIN / "jitmesh-agent"), "--coordinator", "127.0.0.1:1", "--insecure", "--name", "a",
        "--state", str(tmp_path / "s"), "--enforcer", f"file:{tmp_path / 'f'}",
        "--log-level", level, "--print-config",
    )  # fmt: skip
    for done in (coordinator, agent):
        assert done.returncode == 0, done.stderr
        assert 'log_level = "warning"' in done.stdout


def test_a_bad_log_level_is_a_usage_error_in_both_daemons(tmp_path: Path) -> None:
    coordinator = _run(
        str(BIN / "jitmesh-coordinator"), "serve", "--insecure", "--data", str(tmp_path / "d"),
        "--log-level", "loud",
    )  # fmt: skip
    agent = _run(
        str(BIN / "jitmesh-agent"), "--coordinator", "127.0.0.1:1", "--insecure", "--name", "a",
        "--state", str(tmp_path / "s"), "--enforcer", f"file:{tmp_path / 'f'}",
        "--log-level", "loud",
    )  # fmt: skip
    for done in (coordinator, agent):
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert "log level must be one of debug, info, warning, error" in done.stderr
        assert "Traceback" not in done.stderr
