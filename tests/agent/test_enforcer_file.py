"""The file enforcer on a real directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.domain.errors import EnforcerError
from agent.enforcers.base import Enforcer
from agent.enforcers.file import FileEnforcer
from jitmesh.clock import FakeClock

from .factories import T0, cover


@pytest.fixture
def enforcer(tmp_path: Path) -> FileEnforcer:
    return FileEnforcer(tmp_path / "markers", clock=FakeClock(T0))


def test_file_enforcer_implements_the_interface(enforcer: FileEnforcer) -> None:
    typed: Enforcer = enforcer
    assert typed.name == "file"


async def test_apply_writes_one_json_marker(enforcer: FileEnforcer) -> None:
    await enforcer.apply(cover("alice", "deploy"))
    marker = enforcer.directory / "alice:deploy"
    assert json.loads(marker.read_text()) == {
        "subject": "alice",
        "action": "deploy",
        "applied_at": "2026-01-01T12:00:00Z",
    }
    assert sorted(p.name for p in enforcer.directory.iterdir()) == ["alice:deploy"]


async def test_apply_and_remove_are_idempotent(enforcer: FileEnforcer) -> None:
    await enforcer.apply(cover("alice", "deploy"))
    await enforcer.apply(cover("alice", "deploy"))
    assert await enforcer.observe() == {("alice", "deploy")}
    await enforcer.remove("alice", "deploy")
    await enforcer.remove("alice", "deploy")
    assert await enforcer.observe() == set()
    assert list(enforcer.directory.iterdir()) == []


async def test_observe_lists_markers_and_ignores_other_files(enforcer: FileEnforcer) -> None:
    assert await enforcer.observe() == set()  # no directory yet
    await enforcer.apply(cover("alice", "deploy"))
    await enforcer.apply(cover("bob@example.com", "db.read"))
    (enforcer.directory / ".alice:deploy.1234.tmp").write_text("")
    (enforcer.directory / "README").write_text("")
    (enforcer.directory / "Bad Name:x").write_text("")
    assert await enforcer.observe() == {("alice", "deploy"), ("bob@example.com", "db.read")}


@pytest.mark.parametrize(
    ("subject", "action"),
    [("../etc", "passwd"), ("alice/..", "x"), ("alice", "../../x"), ("", "x"), ("-rf", "x")],
)
async def test_names_that_could_be_paths_are_refused(
    enforcer: FileEnforcer, tmp_path: Path, subject: str, action: str
) -> None:
    with pytest.raises(EnforcerError, match="not valid"):
        await enforcer.apply(cover(subject, action))
    with pytest.raises(EnforcerError, match="not valid"):
        await enforcer.remove(subject, action)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


async def test_unwritable_directory_is_an_enforcer_error(tmp_path: Path) -> None:
    blocker = tmp_path / "markers"
    blocker.write_text("a file where the directory should be")
    enforcer = FileEnforcer(blocker)
    with pytest.raises(EnforcerError, match="cannot write marker"):
        await enforcer.apply(cover("alice", "deploy"))
    with pytest.raises(EnforcerError, match="cannot list markers"):
        await enforcer.observe()
