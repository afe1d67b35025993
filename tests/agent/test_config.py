"""Configuration validated at the edge: exec hooks YAML, enforcer specs, agent settings."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.config import (
    AgentConfig,
    ExecEnforcerConfig,
    FileEnforcerConfig,
    parse_enforcer,
    parse_exec_hooks,
)
from agent.domain.errors import ConfigError

GOOD = """\
apply: [/bin/true, "{subject}", "{action}"]
remove: [/bin/true, "{subject}", "{action}"]
observe: [/bin/true]
timeout: 1m30s
env:
  MODE: NO
  AT: 12:30
"""


def test_exec_hooks_parse_as_yaml_1_2() -> None:
    hooks = parse_exec_hooks(GOOD)
    assert hooks.apply == ("/bin/true", "{subject}", "{action}")
    assert hooks.observe == ("/bin/true",)
    assert hooks.timeout == timedelta(seconds=90)
    # YAML 1.1 would have made these false and 750.
    assert hooks.env == {"MODE": "NO", "AT": "12:30"}


def test_exec_hooks_defaults_and_numeric_timeout() -> None:
    hooks = parse_exec_hooks("apply: [/bin/true]\nremove: [/bin/true]\ntimeout: 2.5\n")
    assert hooks.timeout == timedelta(seconds=2.5)
    assert hooks.observe is None
    assert hooks.env == {}
    assert parse_exec_hooks("apply: [/bin/true]\nremove: [/bin/true]\n").timeout == timedelta(
        seconds=10
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("apply: [/bin/true]\n", "remove"),
        ("apply: []\nremove: [/bin/true]\n", "apply"),
        ("apply: ['']\nremove: [/bin/true]\n", "must not be empty"),
        ("apply: [/bin/true]\nremove: [/bin/true]\nobserve: [/bin/ls, '{subject}']\n", "observe"),
        ("apply: [/bin/true]\nremove: [/bin/true]\nenv: {LD_PRELOAD: /x.so}\n", "LD_"),
        ("apply: [/bin/true]\nremove: [/bin/true]\nenv: {JITMESH_SUBJECT: x}\n", "JITMESH"),
        ("apply: [/bin/true]\nremove: [/bin/true]\nenv: {'A B': x}\n", "env names"),
        ("apply: [/bin/true]\nremove: [/bin/true]\ntimeout: forever\n", "timeout"),
        ("apply: [/bin/true]\nremove: [/bin/true]\ntimeout: 1h\n", "at most 10m"),
        ("apply: [/bin/true]\nremove: [/bin/true]\nshell: yes\n", "shell"),
        ("- just\n- a list\n", "mapping"),
        ("apply: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_exec_hooks_are_refused_clearly(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_exec_hooks(text)


def test_hook_errors_do_not_echo_values() -> None:
    text = "apply: [/bin/true]\nremove: [/bin/true]\nenv: {LD_AUDIT: topsecret-canary}\n"
    with pytest.raises(ConfigError) as caught:
        parse_exec_hooks(text)
    assert "topsecret-canary" not in str(caught.value)


def test_enforcer_specs(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks.yaml"
    hooks.write_text(GOOD)
    assert parse_enforcer(f"file:{tmp_path}") == FileEnforcerConfig(directory=tmp_path)
    spec = parse_enforcer(f"exec:{hooks}")
    assert isinstance(spec, ExecEnforcerConfig)
    assert spec.hooks.timeout == timedelta(seconds=90)
    with pytest.raises(ConfigError, match=r"file:DIR, exec:FILE or sudo\|group\|ssh:FILE\.toml"):
        parse_enforcer("sudoers:/etc/sudoers.d")
    with pytest.raises(ConfigError, match=r"file:DIR, exec:FILE or sudo\|group\|ssh:FILE\.toml"):
        parse_enforcer("file:")
    with pytest.raises(ConfigError, match="cannot read"):
        parse_enforcer(f"exec:{tmp_path / 'missing.yaml'}")


def test_enforcer_drift_setting(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks.yaml"
    hooks.write_text(GOOD)
    assert parse_enforcer(f"file:{tmp_path}").drift == "remove"
    assert parse_enforcer(f"file,drift=report:{tmp_path}").drift == "report"
    assert parse_enforcer(f"exec,drift=remove:{hooks}").drift == "remove"
    with pytest.raises(ConfigError, match=r"^enforcer file: drift must be remove or report$"):
        parse_enforcer(f"file,drift=ignore:{tmp_path}")
    with pytest.raises(ConfigError, match=r"^enforcer exec: unknown option"):
        parse_enforcer(f"exec,mode=report:{hooks}")
    with pytest.raises(ConfigError, match=r"^drift: must be remove or report$"):
        FileEnforcerConfig(directory=tmp_path, drift="keep")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^drift: must be remove or report$"):
        ExecEnforcerConfig(
            path=hooks,
            hooks=parse_exec_hooks(GOOD),
            drift="keep",  # type: ignore[arg-type]
        )


def test_agent_config_validates_names_and_labels(tmp_path: Path) -> None:
    config = AgentConfig(
        coordinator="127.0.0.1:7443",
        name="web-1",
        labels={"env": "prod"},
        join_token="jmj_secret",
        insecure=True,
        state_dir=tmp_path,
    )
    assert config.join_token is not None
    assert "jmj_secret" not in repr(config)
    with pytest.raises(ConfigError) as caught:
        AgentConfig(coordinator="x:1", insecure=True, name="Web_1 <script>", state_dir=tmp_path)
    message = str(caught.value)
    assert message.startswith("name ")
    assert "<script>" not in message
    with pytest.raises(ConfigError, match="labels"):
        AgentConfig(
            coordinator="x:1",
            insecure=True,
            name="web-1",
            labels={"Bad Key": "v"},
            state_dir=tmp_path,
        )
    with pytest.raises(ConfigError, match="coordinator"):
        AgentConfig(coordinator="has space:1", insecure=True, name="web-1", state_dir=tmp_path)


def test_blank_join_token_counts_as_none(tmp_path: Path) -> None:
    config = AgentConfig(
        coordinator="x:1", insecure=True, name="web-1", join_token="  ", state_dir=tmp_path
    )
    assert config.join_token is None


def test_agent_config_bounds_and_secrets(tmp_path: Path) -> None:
    class Wrapped:
        def get_secret_value(self) -> str:
            return "jmj_wrapped"

    config = AgentConfig(
        coordinator="x:1", insecure=True, name="web-1", join_token=Wrapped(), state_dir=tmp_path
    )
    assert config.join_token_value() == "jmj_wrapped"
    assert config.state_dir == tmp_path
    assert "jmj_wrapped" not in repr(config)
    bad: list[tuple[str, Any]] = [
        ("backoff_base", -1.0),
        ("heartbeat", 0.0),
        ("keepalive_time", 3601.0),
        ("skew_tolerance", float("nan")),
        ("reconcile_every", True),
        ("remove_retries", 0),
        ("remove_retries", 21),
    ]
    for field, value in bad:
        with pytest.raises(ConfigError, match=field):
            AgentConfig(
                coordinator="x:1", insecure=True, name="web-1", state_dir=tmp_path, **{field: value}
            )
    with pytest.raises(TypeError):
        AgentConfig(coordinator="x:1", insecure=True, name="web-1", state_dir=tmp_path, hooks="x")  # type: ignore[call-arg]


def test_the_agent_never_falls_back_to_plain_text_by_itself(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"speaks TLS.*--ca-file.*--insecure"):
        AgentConfig(coordinator="x:1", name="web-1", state_dir=tmp_path)
    with pytest.raises(ConfigError, match="not both"):
        AgentConfig(
            coordinator="x:1", name="web-1", state_dir=tmp_path, ca_file=tmp_path, insecure=True
        )
