"""Sessions end with the grant.

Commands started through `jitmesh-agent exec` are registered here (their process group, the
grant that allowed them). When the engine really removes a pair's access (the last grant for it
revoked, expired, locked, released), every run of that pair is ended: SIGTERM to its process
group, SIGKILL after the grace period. With `end_sessions = "user"` (for users that exist on the
host only for jitmesh access), every process of the subject's user is ended the same way once no
grant holds anything for them on this host. What was ended is audited (`sessions.ended`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import pwd
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from agent.domain.leases import EventKind, OutboxEvent, Pair, new_event
from jitmesh.clock import Clock

log = logging.getLogger(__name__)

PROC = Path("/proc")
POLL = 0.05


class EndSessions(enum.StrEnum):
    # Only what was started through exec.
    EXEC = "exec"
    # Also every process of the subject's user once their last grant on the host ends.
    USER = "user"


@dataclass
class Run:
    run_id: str
    pair: Pair
    grant_id: str
    pgid: int
    run_as: str
    started_at: datetime
    started_mono: float
    # Why the agent ended it (None: it ended by itself).
    cause: str | None = None
    # Set when the agent starts ending it; the exec client is told.
    ending: asyncio.Event = field(default_factory=asyncio.Event)


class Sessions:
    def __init__(
        self,
        *,
        clock: Clock,
        audit: Callable[[OutboxEvent], Awaitable[None]],
        holds_any: Callable[[str], Awaitable[bool]],
        grace: float = 10.0,
        end: EndSessions = EndSessions.EXEC,
    ) -> None:
        self._clock = clock
        self._audit = audit
        self._holds_any = holds_any
        self.grace = grace
        self.end = end
        self.runs: dict[str, Run] = {}
        self._queue: asyncio.Queue[tuple[Pair, str]] = asyncio.Queue()
        self._busy = 0

    def idle(self) -> bool:
        """Nothing queued and nothing being ended (for tests and shutdown)."""
        return self._queue.empty() and self._busy == 0

    def removed(self, pair: Pair, cause: str) -> None:
        """The engine removed `pair`'s access (a listener: schedules, never waits)."""
        self._queue.put_nowait((pair, cause))

    def add(self, run: Run) -> None:
        self.runs[run.run_id] = run

    def discard(self, run_id: str) -> None:
        self.runs.pop(run_id, None)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            while True:
                pair, cause = await self._queue.get()
                for item in [r for r in self.runs.values() if r.pair == pair and r.cause is None]:
                    tasks.create_task(self.end_run(item, cause))
                if self.end is EndSessions.USER:
                    self._busy += 1
                    tasks.create_task(self._end_user(pair, cause))

    async def end_run(self, run: Run, cause: str) -> None:
        """SIGTERM to the run's process group, SIGKILL after the grace period; audited."""
        if run.cause is not None:
            return
        run.cause = cause
        run.ending.set()
        ended = await self.end_group(run.pgid)
        log.info(
            "exec run ended with its grant",
            extra={"grant_id": run.grant_id, "subject": run.pair[0], "cause": cause},
        )
        await self._audit(
            new_event(
                EventKind.SESSIONS_ENDED,
                at=self._clock.now(),
                pair=run.pair,
                grant_id=run.grant_id,
                details={
                    "user": run.run_as,
                    "processes": str(ended),
                    "cause": cause,
                    "scope": "exec",
                    "run_id": run.run_id,
                },
            )
        )

    async def end_group(self, pgid: int) -> int:
        """End process group `pgid`: SIGTERM, then SIGKILL whatever is left after the grace.
        Returns how many processes it had."""
        members = len(_group_members(pgid))
        if not _signal_group(pgid, signal.SIGTERM):
            return members
        if await self._gone(lambda: not _group_members(pgid)):
            return members
        _signal_group(pgid, signal.SIGKILL)
        await self._gone(lambda: not _group_members(pgid))
        return members

    async def _end_user(self, pair: Pair, cause: str) -> None:
        try:
            await self._end_user_now(pair, cause)
        finally:
            self._busy -= 1

    async def _end_user_now(self, pair: Pair, cause: str) -> None:
        subject = pair[0]
        if await self._holds_any(subject):
            return
        try:
            uid = pwd.getpwnam(subject).pw_uid
        except KeyError:
            return
        if uid == 0:
            return  # never root's processes, whatever the configuration says
        pids = _user_processes(uid)
        if not pids:
            return
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        if not await self._gone(lambda: not _user_processes(uid)):
            for pid in _user_processes(uid):
                _signal(pid, signal.SIGKILL)
            await self._gone(lambda: not _user_processes(uid))
        log.info("user sessions ended with the last grant", extra={"subject": subject})
        await self._audit(
            new_event(
                EventKind.SESSIONS_ENDED,
                at=self._clock.now(),
                pair=pair,
                details={
                    "user": subject,
                    "processes": str(len(pids)),
                    "cause": cause,
                    "scope": "user",
                },
            )
        )

    async def _gone(self, done: Callable[[], bool]) -> bool:
        """Wait up to the grace period (on the real clock: processes do not follow a fake one)
        for `done`."""
        deadline = asyncio.get_running_loop().time() + self.grace
        while not done():
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(POLL)
        return True


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("cannot signal an exec run (not permitted)", extra={"pgid": pgid})
        return False
    return True


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _stat_fields(pid: str) -> list[str] | None:
    try:
        raw = (PROC / pid / "stat").read_text()
    except OSError:
        return None
    # The command name (2nd field) may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir(PROC):
        if not entry.isdigit():
            continue
        fields = _stat_fields(entry)
        # fields[0] is the state (zombies are already gone for our purpose), fields[2] the pgrp.
        if fields and fields[0] != "Z" and fields[2] == str(pgid):
            members.append(int(entry))
    return members


def _user_processes(uid: int) -> list[int]:
    found = []
    for entry in os.listdir(PROC):
        if not entry.isdigit():
            continue
        try:
            status = (PROC / entry / "status").read_text()
        except OSError:
            continue
        fields = _stat_fields(entry)
        if fields is None or fields[0] == "Z":
            continue
        for line in status.splitlines():
            if line.startswith("Uid:"):
                if int(line.split()[1]) == uid:
                    found.append(int(entry))
                break
    return found


def process_info(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, process group, real uid) of a live process (None: gone)."""
    fields = _stat_fields(str(pid))
    if fields is None or fields[0] == "Z":
        return None
    try:
        status = (PROC / str(pid) / "status").read_text()
    except OSError:
        return None
    uid = next(
        (int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:")), -1
    )
    return int(fields[1]), int(fields[2]), uid
