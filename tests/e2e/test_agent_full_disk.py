"""An agent whose state directory is on a full disk (issue 10, item F): it says the disk is full,
never moves the lease table aside as if it were damaged, stops at once on SIGTERM while its
schema migration is stuck, and leaves no migration child behind, even when SIGKILLed.

The full disk is a real 256 KiB tmpfs, filled with a file, mounted in a private mount namespace
(`unshare --mount`: the machine's own mounts are never touched); the agent is the real
`jitmesh-agent` process in it, signalled with real signals. A migration is held stuck by a write
lock another process keeps on the database (SQLite's own locking), which makes the child wait
as a full disk used to.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from .procs import BIN, free_port, wait_for

pytestmark = pytest.mark.subprocess

# Mount a tiny tmpfs on $1, leave one page free (the agent's lock file), run the agent (the rest
# of the arguments) in the background, say its pid, wait for it, then list what it left there.
_FULL_DISK = """
set -e
mount -t tmpfs -o size=256k,mode=0755 tmpfs "$1"
head -c 4096 /dev/zero > "$1/spare"
cat /dev/zero > "$1/fill" 2>/dev/null || true
rm "$1/spare"
mkdir "$1/state"
shift
"$@" 2>"$AGENT_ERR" &
echo "pid $!"
set +e
wait $!
echo "exit $?"
echo "left $(ls -A "$STATE" | tr '\\n' ' ')"
"""


def agent_argv(state: Path, access: Path) -> list[str]:
    return [
        str(BIN / "jitmesh-agent"), "--coordinator", f"127.0.0.1:{free_port()}",
        "--name", "web-1", "--join-token", "jmj_unused", "--insecure",
        "--state", str(state), "--enforcer", f"file:{access}",
    ]  # fmt: skip


def migration_children(db: Path) -> list[int]:
    """Processes running the schema migration of `db` (none once the agent is gone)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"agent.store.migrate" in argv and str(db).encode() in argv:
            found.append(int(entry.name))
    return found


async def test_a_full_disk_is_named_and_never_taken_for_a_damaged_table(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        raise AssertionError("this test needs root (a private mount namespace and a tmpfs)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    access = tmp_path / "access"
    access.mkdir()
    err = tmp_path / "agent.err"
    state = mnt / "state"
    proc = await asyncio.create_subprocess_exec(
        "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-c", _FULL_DISK, "sh", str(mnt), *agent_argv(state, access),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "AGENT_ERR": str(err), "STATE": str(state)},
    )  # fmt: skip
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        first = (await proc.stdout.readline()).decode()
    match = re.fullmatch(r"pid (\d+)\n", first)
    assert match, first
    started = time.monotonic()
    # Told at once: within a few seconds (it took 21 s, and then said "DatabaseError").
    async with asyncio.timeout(10):
        rest, problems = await proc.communicate()
    took = time.monotonic() - started
    report = dict(line.split(" ", 1) for line in rest.decode().splitlines())
    said = err.read_text()
    assert report["exit"] == "2", (report, said, problems)
    assert "is full" in said, said
    assert str(state) in said, said
    assert "DatabaseError" not in said, said
    assert "Traceback" not in said, said
    # Nothing renamed as corrupt: only the lock file (and at most an empty database) is there.
    assert "corrupt" not in report["left"], report
    assert took < 10
    assert migration_children(state / "agent.db") == []


def hold_write_lock(db: Path) -> sqlite3.Connection:
    """A database with a pending schema (so the agent migrates it) and a write lock held on it:
    the migration child waits on it, as it waited on a full disk."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE placeholder (x)")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO placeholder VALUES (1)")
    return conn


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
async def test_a_stuck_migration_stops_with_the_agent(tmp_path: Path, sig: signal.Signals) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o711)
    access = tmp_path / "access"
    access.mkdir()
    db = state / "agent.db"
    lock = hold_write_lock(db)
    log = tmp_path / "agent.log"
    try:
        with open(log, "wb") as out:
            agent = subprocess.Popen(
                agent_argv(state, access), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        try:
            await wait_for(lambda: bool(migration_children(db)), 30, "the migration child")
            children = migration_children(db)
            agent.send_signal(sig)
            # At once: the agent does not wait for its child to give up on the lock.
            await wait_for(lambda: agent.poll() is not None, 3, "the agent to exit")
            if sig == signal.SIGTERM:
                assert agent.returncode == 0, log.read_text()
            # And the child went with it (killed by the agent, or by the kernel on SIGKILL).
            await wait_for(lambda: all(_gone(pid) for pid in children), 3, "the child to be gone")
            assert migration_children(db) == []
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait(timeout=10)
    finally:
        lock.close()
    assert not list(state.glob("agent.db.corrupt-*"))


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie (dead, waiting for whoever reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith(("Z", "X"))
    except (OSError, IndexError):
        return True
