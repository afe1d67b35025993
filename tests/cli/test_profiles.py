"""Connection profiles in ~/.config/jitmesh/config.toml, read by jitctl and the SDK: a flag
beats a JITMESH_* variable, which beats the profile."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from jitmesh import Client, InvalidArgumentError, profiles
from tests.cli.conftest import Jitctl
from tests.sdk.scripted import TOKEN, Scripted, ServerThread, make_agent


def _closed() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, coordinator: ServerThread) -> Path:
    """A config file with two profiles, the environment emptied of connection variables."""
    token = tmp_path / "ops.token"
    token.write_text(TOKEN + "\n")
    path = tmp_path / "config.toml"
    path.write_text(
        'default_profile = "ops"\n'
        f'[profiles.ops]\ncoordinator = "{coordinator.target}"\ntoken_file = "{token}"\n'
        "insecure = true\n"
        f'[profiles.nowhere]\ncoordinator = "{_closed()}"\ntoken_file = "{token}"\n'
        "insecure = true\n"
    )
    monkeypatch.setenv("JITMESH_CONFIG", str(path))
    for name in ("JITMESH_COORDINATOR", "JITMESH_TOKEN", "JITMESH_PROFILE", "JITMESH_INSECURE"):
        monkeypatch.delenv(name, raising=False)
    return path


def test_jitctl_uses_the_default_profile(model: Scripted, jitctl: Jitctl, config: Path) -> None:
    model.put(make_agent("web-1"))
    result = jitctl("agent", "list", "-o", "json")
    assert result.code == 0, result.err
    assert [a["name"] for a in result.json()] == ["web-1"]


def test_flag_beats_environment_beats_profile(
    jitctl: Jitctl, config: Path, coordinator: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The named profile points nowhere: it fails...
    assert jitctl("--profile", "nowhere", "agent", "list").code == 6
    # ...unless the environment names the coordinator, which beats the profile...
    monkeypatch.setenv("JITMESH_COORDINATOR", coordinator.target)
    assert jitctl("--profile", "nowhere", "agent", "list").code == 0
    # ...unless a flag names another, which beats the environment.
    assert jitctl("--coordinator", _closed(), "agent", "list").code == 6
    monkeypatch.setenv("JITMESH_PROFILE", "nowhere")
    monkeypatch.delenv("JITMESH_COORDINATOR")
    assert jitctl("agent", "list").code == 6
    assert jitctl("agent", "list", "--profile", "ops").code == 0


def test_unknown_profile_is_a_usage_error(jitctl: Jitctl, config: Path) -> None:
    result = jitctl("--profile", "staging", "agent", "list")
    assert result.code == 2
    assert result.error_line() == (
        f"jitctl: no profile staging in {config} (profiles: nowhere, ops)"
    )


async def test_sdk_reads_the_same_profiles(
    model: Scripted, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model.put(make_agent("db-1"))
    async with await Client.from_config() as client:
        assert [a.name for a in await client.list_agents()] == ["db-1"]
    with pytest.raises(InvalidArgumentError):
        await Client.from_config("staging")


def test_resolution_order(tmp_path: Path) -> None:
    token = tmp_path / "t"
    token.write_text("from-profile")
    path = tmp_path / "c.toml"
    path.write_text(
        f'[profiles.default]\ncoordinator = "p:1"\ntoken_file = "{token}"\nca_file = "/p.pem"\n'
    )
    env = {"JITMESH_CONFIG": str(path)}
    found = profiles.resolve(environ=env)
    assert (found.coordinator, found.token, found.ca_file, found.profile) == (
        "p:1", "from-profile", "/p.pem", "default"
    )  # fmt: skip
    found = profiles.resolve(environ={**env, "JITMESH_COORDINATOR": "e:1", "JITMESH_TOKEN": "t"})
    assert (found.coordinator, found.token) == ("e:1", "t")
    assert profiles.resolve(coordinator="f:1", environ=env).coordinator == "f:1"
    # A transport chosen by the environment keeps the profile's CA file out.
    found = profiles.resolve(environ={**env, "JITMESH_INSECURE": "1"})
    assert (found.ca_file, found.insecure) == (None, None)
    assert profiles.resolve(environ={"JITMESH_CONFIG": str(tmp_path / "none.toml")}).profile is None
