"""All-or-nothing application across several enforcers."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.domain.errors import ApplyFailed, EnforcerError
from agent.enforcers.base import EnforcerSet
from agent.enforcers.file import FileEnforcer

from .factories import cover
from .fakes import RecordingEnforcer

PAIR = ("alice", "deploy")


async def test_apply_runs_every_enforcer_in_order(tmp_path: Path) -> None:
    files = FileEnforcer(tmp_path)
    recorder = RecordingEnforcer()
    await EnforcerSet([files, recorder]).apply(cover(*PAIR))
    assert await files.observe() == {PAIR}
    assert recorder.calls == [("apply", PAIR)]


async def test_a_failing_enforcer_rolls_back_the_others(tmp_path: Path) -> None:
    files = FileEnforcer(tmp_path)
    broken = RecordingEnforcer("broken")
    broken.fail_apply.add(PAIR)
    after = RecordingEnforcer("after")
    with pytest.raises(ApplyFailed) as caught:
        await EnforcerSet([files, broken, after]).apply(cover(*PAIR))
    assert caught.value.rolled_back
    assert "apply refused" in str(caught.value)
    assert await files.observe() == set()
    # The failing one is removed too (it may have got halfway); the later one never ran.
    assert broken.calls == [("apply", PAIR), ("remove", PAIR)]
    assert after.calls == []


async def test_a_failed_rollback_is_reported(tmp_path: Path) -> None:
    sticky = RecordingEnforcer("sticky")
    sticky.fail_remove.add(PAIR)
    broken = RecordingEnforcer("broken")
    broken.fail_apply.add(PAIR)
    with pytest.raises(ApplyFailed) as caught:
        await EnforcerSet([sticky, broken]).apply(cover(*PAIR))
    assert not caught.value.rolled_back
    assert sticky.in_force == {PAIR}


async def test_remove_tries_every_enforcer_then_raises_the_first_error(tmp_path: Path) -> None:
    journal: list[tuple[str, str]] = []
    first = RecordingEnforcer("first", journal)
    stuck = RecordingEnforcer("stuck", journal)
    last = RecordingEnforcer("last", journal)
    enforcers = EnforcerSet([first, stuck, last])
    await enforcers.apply(cover(*PAIR))
    stuck.fail_remove.add(PAIR)
    journal.clear()
    with pytest.raises(EnforcerError, match="stuck: remove refused"):
        await enforcers.remove(PAIR)
    assert first.in_force == set()
    assert last.in_force == set()
    assert stuck.in_force == {PAIR}
    # Removal goes last first.
    assert journal == [("last", "remove"), ("stuck", "remove"), ("first", "remove")]
