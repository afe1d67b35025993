"""Hook hardening: the agent refuses exec hooks whose file, program or directories someone else
could change, before it runs anything."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.config import parse_enforcer
from agent.domain.errors import ConfigError


def hooks_file(root: Path, program: Path) -> Path:
    root.mkdir(mode=0o700, exist_ok=True)
    path = root / "hooks.yaml"
    path.write_text(f'apply: [{program}, "{{subject}}"]\nremove: [{program}, "{{subject}}"]\n')
    path.chmod(0o600)
    return path


def program(root: Path) -> Path:
    root.mkdir(mode=0o700, exist_ok=True)
    path = root / "hook"
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o700)
    return path


def test_private_hooks_are_accepted(tmp_path: Path) -> None:
    hook = program(tmp_path / "bin")
    assert parse_enforcer(f"exec:{hooks_file(tmp_path / 'etc', hook)}").kind == "exec"


@pytest.mark.parametrize(
    ("target", "mode"),
    [
        ("file", 0o620),  # group-writable hooks file
        ("file", 0o602),  # world-writable hooks file
        ("file dir", 0o770),  # group-writable directory above the file
        ("program", 0o757),  # world-writable hook program
        ("program dir", 0o777),  # world-writable directory above the program
    ],
)
def test_hooks_someone_else_could_change_are_refused(
    tmp_path: Path, target: str, mode: int
) -> None:
    hook = program(tmp_path / "bin")
    path = hooks_file(tmp_path / "etc", hook)
    victim = {"file": path, "file dir": path.parent, "program": hook, "program dir": hook.parent}
    victim[target].chmod(mode)
    with pytest.raises(ConfigError, match="writable by group or others"):
        parse_enforcer(f"exec:{path}")


def test_a_symlink_is_judged_by_its_target(tmp_path: Path) -> None:
    hook = program(tmp_path / "bin")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    real = hooks_file(tmp_path / "etc", hook)
    moved = shared / "hooks.yaml"
    real.rename(moved)
    link = tmp_path / "etc" / "hooks.yaml"
    link.symlink_to(moved)
    with pytest.raises(ConfigError, match="writable by group or others"):
        parse_enforcer(f"exec:{link}")


def test_a_missing_hook_program_is_refused(tmp_path: Path) -> None:
    path = hooks_file(tmp_path / "etc", tmp_path / "nowhere" / "hook")
    with pytest.raises(ConfigError, match="not found"):
        parse_enforcer(f"exec:{path}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.getuid() == path.stat().st_uid
