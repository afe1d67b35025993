"""The SQLite lease store's WAL: never checkpointed inside a commit, checkpointed beside the commits
(`run_checkpoints`), bounded under commits that never pause, and nothing acked lost to a SIGKILL
while checkpoints run."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.store.readonly import DB_NAME
from agent.store.sqlite import SqliteLeaseStore

from .factories import lease

# SQLite's automatic checkpoint ran in the commit that took the WAL past this many pages.
AUTOCHECKPOINT_PAGES = 1000


def wal_frames(state: Path) -> int:
    """Frames in the WAL now, asked from another connection (PASSIVE copies, never waits)."""
    db = sqlite3.connect(state / DB_NAME, isolation_level=None)
    try:
        _, frames, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        db.close()
    return int(frames)


def wal_restarts(state: Path) -> int:
    """The WAL header's checkpoint sequence number: it goes up each time the WAL starts over."""
    header = (state / f"{DB_NAME}-wal").read_bytes()[:16]
    return int.from_bytes(header[12:16], "big")


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[SqliteLeaseStore]:
    store = SqliteLeaseStore.open(tmp_path, checkpoint_every=10**9, wal_max_frames=64)
    yield store
    store.close()


async def commit(store: SqliteLeaseStore, seq: int) -> None:
    await store.record_command(seq=seq, epoch=1, writes=[lease(seq=seq)])


async def test_commits_never_checkpoint(opened: SqliteLeaseStore, tmp_path: Path) -> None:
    # With SQLite's automatic checkpoint, the commit that crossed 1,000 pages copied the WAL
    # back (and synced) and the WAL started over: the WAL would never hold more.
    for seq in range(1, 401):
        await commit(opened, seq)
    size = (tmp_path / f"{DB_NAME}-wal").stat().st_size
    assert size > AUTOCHECKPOINT_PAGES * 4096
    assert wal_restarts(tmp_path) == 0


async def test_a_checkpoint_lets_the_next_commit_start_the_wal_over(
    opened: SqliteLeaseStore, tmp_path: Path
) -> None:
    for seq in range(1, 101):
        await commit(opened, seq)
    done_all, frames = await opened.checkpoint()
    assert done_all
    assert frames > 100
    await commit(opened, 101)
    assert wal_restarts(tmp_path) == 1
    assert wal_frames(tmp_path) < 10


async def test_run_checkpoints_checkpoints_after_every_so_many_commits(tmp_path: Path) -> None:
    store = SqliteLeaseStore.open(tmp_path, checkpoint_every=20)
    checkpointed = asyncio.Event()
    real = store.checkpoint

    async def observed() -> tuple[bool, int]:
        result = await real()
        checkpointed.set()
        return result

    store.checkpoint = observed  # type: ignore[method-assign]
    try:
        async with asyncio.TaskGroup() as tasks:
            runner = tasks.create_task(store.run_checkpoints())
            for seq in range(1, 21):
                await commit(store, seq)
            async with asyncio.timeout(10):
                await checkpointed.wait()
            runner.cancel()
        await commit(store, 21)
        assert wal_restarts(tmp_path) == 1
    finally:
        store.close()


async def test_a_failed_checkpoint_is_not_the_end_of_them(tmp_path: Path) -> None:
    store = SqliteLeaseStore.open(tmp_path, checkpoint_every=5)
    calls: list[int] = []
    second = asyncio.Event()

    async def failing_once() -> tuple[bool, int]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("can't start new thread")
        second.set()
        return True, 0

    store.checkpoint = failing_once  # type: ignore[method-assign]
    try:
        async with asyncio.TaskGroup() as tasks:
            runner = tasks.create_task(store.run_checkpoints())
            for seq in range(1, 11):
                await commit(store, seq)
                await asyncio.sleep(0)
            async with asyncio.timeout(10):
                await second.wait()
            runner.cancel()
    finally:
        store.close()


async def test_commits_during_every_pass_still_bound_the_wal(
    opened: SqliteLeaseStore, tmp_path: Path
) -> None:
    """Commands that never pause: a commit lands in each pass on the worker thread, after the
    WAL's end that pass copies up to, so none of them lets the WAL start over. Past
    `wal_max_frames` a last pass runs inline, and the next commit starts the WAL over."""
    loop = asyncio.get_running_loop()
    seq = 0

    async def one_more() -> None:
        nonlocal seq
        seq += 1
        await commit(opened, seq)

    real = opened._checkpoint_beside

    def racing() -> tuple[bool, int]:
        # On the worker thread. A read begun before the commit holds the pass to the WAL's end
        # before it, as a pass that began before the commit would stop there.
        reader = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM leases").fetchone()
            asyncio.run_coroutine_threadsafe(one_more(), loop).result(timeout=10)
            return real()
        finally:
            reader.close()

    opened._checkpoint_beside = racing  # type: ignore[method-assign]
    for _ in range(40):
        await one_more()
    # Below the bound: the passes leave their tails, nothing runs inline.
    opened._wal_max_frames = 10**6
    restarts = wal_restarts(tmp_path)
    done_all, frames = await opened.checkpoint()
    assert (done_all, seq) == (False, 43)
    await one_more()
    assert wal_restarts(tmp_path) == restarts
    # Past it: inline, and the next commit starts the WAL over.
    opened._wal_max_frames = 64
    done_all, frames = await opened.checkpoint()
    assert done_all
    assert frames > 64
    await one_more()
    assert wal_restarts(tmp_path) == restarts + 1


CHILD = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pathlib import Path

    from agent.store.sqlite import SqliteLeaseStore
    from tests.agent.factories import lease

    async def main() -> None:
        store = SqliteLeaseStore.open(Path(sys.argv[1]), checkpoint_every=7)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(store.run_checkpoints())
            for seq in range(1, 301):
                item = lease(seq=seq, grant_id=f"grt-{seq:032x}")
                await store.record_command(seq=seq, epoch=1, writes=[item])
                # The "ack": the commit returned. Let the checkpointer start a pass now and
                # then, so the kill can fall into one.
                if seq % 5 == 0:
                    await asyncio.sleep(0)
            print(seq, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


@pytest.mark.subprocess
async def test_a_sigkill_right_after_the_commit_loses_nothing(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert child.stdout.split() == ["300"]
    store = SqliteLeaseStore.open(tmp_path)
    try:
        assert (await store.meta()).last_applied_seq == 300
        found = await store.leases(f"grt-{seq:032x}" for seq in range(1, 301))
        assert len(found) == 300
    finally:
        store.close()
