"""[enforcers.group] and [enforcers.ssh] in the agent's TOML file (the real programs run in
tests/host)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import GroupEnforcerConfig, SshEnforcerConfig, parse_enforcer
from agent.domain.errors import ConfigError


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_group_and_ssh_sections(tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        '[enforcers.group.actions]\ndeploy = ["docker", "deployers"]\n'
        '[enforcers.ssh]\nkeys = "/etc/jitmesh/ssh-keys"\nactions = ["ssh", "login"]\n',
    )
    group = parse_enforcer(f"group,drift=report:{path}")
    assert isinstance(group, GroupEnforcerConfig)
    assert group.settings.actions == {"deploy": ("docker", "deployers")}
    assert group.drift == "report"
    ssh = parse_enforcer(f"ssh:{path}")
    assert isinstance(ssh, SshEnforcerConfig)
    assert ssh.settings.actions == {"ssh", "login"}
    assert ssh.settings.directory == Path("/etc/ssh/jitmesh_keys")


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("group", '[enforcers.group.actions]\ndeploy = ["Bad Group"]\n', "group names"),
        ("group", "[enforcers.group]\nshell = true\n", "unknown keys"),
        ("ssh", '[enforcers.ssh]\nkeys = "relative"\n', "absolute path"),
        ("ssh", '[enforcers.ssh]\nkeys = "/k"\nactions = ["SSH"]\n', "action names"),
        ("ssh", "[enforcers.sudo]\n", r"no \[enforcers.ssh\]"),
    ],
)
def test_bad_sections_are_refused(tmp_path: Path, kind: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_enforcer(f"{kind}:{toml(tmp_path, text)}")
