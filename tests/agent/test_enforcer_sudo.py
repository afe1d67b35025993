"""The sudo enforcer's configuration and drop-in text (the real sudo runs in tests/host)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from agent.config import SudoEnforcerConfig, load_sudo, parse_enforcer
from agent.domain.errors import ConfigError
from agent.enforcers.sudo import Bundle, SudoEnforcer, SudoSettings, parse_bundles, render

from .factories import cover


def test_a_drop_in_has_one_rule_per_command_with_the_utc_window() -> None:
    window = cover("alice", "deploy", length=timedelta(minutes=15, milliseconds=300))
    text = render(window, Bundle(("/usr/bin/systemctl restart app", "/bin/echo a=b,c"), "app"))
    rules = [line for line in text.splitlines() if not line.startswith("#")]
    # Never past not_after: the last whole second before it (sudo allows through that second).
    assert rules == [
        '"alice" ALL = (app) NOTBEFORE=20260101120000Z NOTAFTER=20260101121459Z '
        "NOPASSWD: /usr/bin/systemctl restart app",
        '"alice" ALL = (app) NOTBEFORE=20260101120000Z NOTAFTER=20260101121459Z '
        "NOPASSWD: /bin/echo a\\=b\\,c",
    ]
    asked = render(window, Bundle(("/usr/bin/id",), nopasswd=False))
    assert "NOPASSWD" not in asked


def test_file_names_carry_no_dot_sudo_would_skip() -> None:
    enforcer = SudoEnforcer(SudoSettings({}, Path("/x")))
    assert enforcer.path_for("bob@example.com", "db.read").name == (
        "jitmesh_bob_40example_2ecom__db_2eread"
    )


def test_bundles_as_lists_or_tables() -> None:
    bundles = parse_bundles(
        {"deploy": ["/usr/bin/systemctl restart app"], "db": {"commands": ["/usr/bin/psql"],
         "run_as": "postgres", "nopasswd": False}}
    )  # fmt: skip
    assert bundles["deploy"] == Bundle(("/usr/bin/systemctl restart app",))
    assert bundles["db"] == Bundle(("/usr/bin/psql",), "postgres", False)
    assert parse_bundles({"id": ['/usr/bin/id ""']})["id"].commands == ('/usr/bin/id ""',)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"Deploy": ["/bin/true"]}, "action names"),
        ({"deploy": []}, "1 to 64 commands"),
        ({"deploy": ["systemctl restart app"]}, "absolute path"),
        ({"deploy": ["/bin/sh\nALL ALL=(ALL) ALL"]}, "one line"),
        ({"deploy": ['/bin/echo "x"']}, "without quotes"),
        ({"deploy": ["/bin/a,b"]}, "program path"),
        ({"deploy": {"commands": ["/bin/true"], "run_as": "%wheel"}}, "run_as"),
        ({"deploy": {"commands": ["/bin/true"], "nopasswd": "yes"}}, "nopasswd"),
        ({"deploy": {"commands": ["/bin/true"], "shell": True}}, "unknown keys"),
    ],
)
def test_bad_bundles_are_refused_without_echoing_commands(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_bundles(raw)
    assert "ALL ALL" not in str(caught.value)


def test_the_agent_reads_enforcers_sudo_from_its_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        '[enforcers.sudo]\ndirectory = "/etc/sudoers.d"\n'
        '[enforcers.sudo.actions]\nrestart = ["/usr/bin/systemctl restart app"]\n'
    )
    path.chmod(0o600)
    spec = parse_enforcer(f"sudo,drift=report:{path}")
    assert isinstance(spec, SudoEnforcerConfig)
    assert spec.drift == "report"
    assert spec.settings.actions["restart"].commands == ("/usr/bin/systemctl restart app",)
    path.write_text("[enforcers.sudo\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_sudo(path)
    path.write_text("[enforcers.file]\n")
    with pytest.raises(ConfigError, match=r"no \[enforcers.sudo\]"):
        load_sudo(path)
    path.write_text('[enforcers.sudo]\ndirectory = "relative"\n')
    with pytest.raises(ConfigError, match="absolute path"):
        load_sudo(path)
    path.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by group or others"):
        load_sudo(path)
