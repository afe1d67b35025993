"""The file enforcer on a real directory."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest

from agent.domain.errors import EnforcerError
from agent.enforcers.base import Enforcer
from agent.enforcers.file import MAX_SPARES, FileEnforcer
from jitmesh.clock import FakeClock

from .factories import T0, cover

LATER = timedelta(microseconds=123456)


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
    assert names(enforcer) == [".alice:deploy.spare"]


def names(enforcer: FileEnforcer) -> list[str]:
    return sorted(p.name for p in enforcer.directory.iterdir())


async def test_the_next_apply_rewrites_the_removed_marker_in_place(tmp_path: Path) -> None:
    # A new file allocates an inode (on ext4 a wait for the journal): the spare's is reused.
    clock = FakeClock(T0 + LATER)
    enforcer = FileEnforcer(tmp_path, clock=clock)
    await enforcer.apply(cover("alice", "deploy"))
    marker = tmp_path / "alice:deploy"
    # Held open: a deleted file's inode could not be handed out again meanwhile.
    fd = os.open(marker, os.O_RDONLY)
    try:
        await enforcer.remove("alice", "deploy")
        assert not marker.exists()
        # A shorter line this time (no microseconds): nothing of the longer one is left.
        await clock.jump_wall(-LATER)
        await enforcer.apply(cover("alice", "deploy"))
        assert marker.stat().st_ino == os.fstat(fd).st_ino
    finally:
        os.close(fd)
    assert marker.read_text() == (
        '{"action": "deploy", "applied_at": "2026-01-01T12:00:00Z", "subject": "alice"}\n'
    )
    assert names(enforcer) == ["alice:deploy"]


async def test_a_spare_is_never_written_through(tmp_path: Path) -> None:
    enforcer = FileEnforcer(tmp_path / "markers", clock=FakeClock(T0))
    await enforcer.apply(cover("alice", "deploy"))
    await enforcer.remove("alice", "deploy")
    spare = enforcer.directory / ".alice:deploy.spare"
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    # Swapped for a symbolic link, then for a second name of another file: a new marker.
    for link in (True, False):
        spare.unlink()
        if link:
            spare.symlink_to(victim)
        else:
            os.link(victim, spare)
        await enforcer.apply(cover("alice", "deploy"))
        assert victim.read_text() == "untouched"
        assert json.loads((enforcer.directory / "alice:deploy").read_text())["subject"] == "alice"
        assert names(enforcer) == ["alice:deploy"]
        await enforcer.remove("alice", "deploy")


async def test_spares_are_bounded_and_strays_go_at_observe(enforcer: FileEnforcer) -> None:
    enforcer.directory.mkdir()
    (enforcer.directory / ".bob:deploy.spare").write_text("an earlier run's")
    for k in range(MAX_SPARES + 3):
        await enforcer.apply(cover("alice", f"a{k}"))
        await enforcer.remove("alice", f"a{k}")
    kept = [f".alice:a{k}.spare" for k in range(3, MAX_SPARES + 3)]
    assert names(enforcer) == sorted([".bob:deploy.spare", *kept])
    assert await enforcer.observe() == set()
    assert names(enforcer) == sorted(kept)


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
