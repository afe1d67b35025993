"""A part of a swarm in its own process, for scenarios 6 (reconnect after SIGKILL), 14 (fan-out
over mTLS) and 17 (failover between replicas).

One process cannot redial 10,000 links fast enough to measure the coordinator: each attempt
builds a channel and a call in Python, and one event loop did 340 of them a second, saturated,
while the restarted coordinator idled (docs/performance.md, "Reconnect"). A real fleet redials
from 10,000 hosts; here the fleet is split over several of these processes, each running its
share of the agents on the real agents' reconnect schedule (`agent.defaults`: base 1 s, cap
15 s, full jitter).

    python -m bench.swarmproc TARGETS CREDENTIALS_DIR PREFIX FIRST COUNT [CA_FILE]
    (join token: $JOIN_ENV)

TARGETS: the coordinator's address, or several comma-separated (failover, first one first).
The agents are PREFIX-FIRST... (tests/support/swarm.py). With CA_FILE (the coordinator's CA),
each agent enrolls with a key and a CSR and connects over mTLS with its own certificate
(scenario 14); without, plain text and bearer credentials.

Talks JSON lines. Out: `{"connected": N}` whenever the count of connected agents changes;
after `watch SINCE_MS [ADDRESS]` came in, `{"watching": M, "staying": S}` (the agents watched,
and with ADDRESS those connected elsewhere), then `{"back": N, "at": T}` whenever the count of
agents back changes (connected, with contact after SINCE_MS; T is `time.monotonic()`, one clock
for every process of the machine), then `{"done": ..., "downs": D, "pushed_back": P}`; after
`report`, `{"report": ..., "connected": N, "dropped": A, "stream_ends": E}` (A: agents whose
established stream ended since the `watch`; E: such ends in all; with ADDRESS, N, A and E count
the staying agents only). In: `watch SINCE_MS [ADDRESS]` (also resets those counts), `report`,
`quit`.

Without ADDRESS every agent is watched (a restart: all of them come back). With it (a failover:
ADDRESS is the replica about to be killed) only the agents connected to ADDRESS at that moment
are watched for their return, and the streams that end are counted for the agents connected to
another replica: an agent is on whichever replica last served it, not necessarily the first in
its list (an address that failed during the first connection moves it to the next).

For a fan-out (scenario 14): `follow ID SUBJECT ACTION` takes each agent's enforcer history
length as its mark and from then on says `{"follow": ID, "in_force": F, "removed": R, "last": T}`
at once and whenever F or R changes: F agents have (SUBJECT, ACTION) in force, R removed it
after the mark, T is the latest of those removals by the enforcer's own `time.monotonic()`
stamp (the moment it removed the access, not when this process noticed; null: none yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent import defaults
from tests.support.swarm import Swarm, SwarmSettings

JOIN_ENV = "JITMESH_BENCH_JOIN_TOKEN"
# How often the counts are looked at.
TICK = 0.1


class LinkDowns(logging.Handler):
    """Counts the swarm's "link down" records: each one is a stream that ended or failed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        # Of those, the attempts refused by admission control (RESOURCE_EXHAUSTED, a hint).
        self.pushed_back = 0
        # Each reason's count (the status code and its details, or what the link saw).
        self.reasons: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "link down":
            self.count += 1
            reason = str(getattr(record, "reason", ""))
            self.reasons[reason[:80]] += 1
            if reason.startswith("RESOURCE_EXHAUSTED"):
                self.pushed_back += 1


async def run_links(swarm: Swarm) -> None:
    """`Swarm.run` without the engines' expiry loops, which would measure the swarm, not the
    coordinator. Nothing expires during the benchmark (grants last an hour); every command
    still goes through the real Engine."""
    await swarm.run(expiry_loops=False)


def _say(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _commands(queue: asyncio.Queue[str]) -> None:
    """The parent's lines from stdin; its end (the parent gone) is a `quit`."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode()
        await queue.put(line.strip() or "quit")
        if not line:
            return


def _count_drops(swarm: Swarm) -> Counter[str]:
    """From now on, counts per agent each time its engine goes from connected to lost (the
    link calls `coordinator_lost` whenever a stream ends or an attempt fails; only the calls
    while connected are an established stream ending)."""
    drops: Counter[str] = Counter()
    for agent in swarm.agents:
        engine = agent.engine
        lost = engine.coordinator_lost

        async def counted(name: str = agent.name, engine: Any = engine, lost: Any = lost) -> None:
            if engine.connected:
                drops[name] += 1
            await lost()

        # The instance attribute shadows the method: the link calls through it.
        setattr(engine, "coordinator_lost", counted)  # noqa: B010
    return drops


def _split(swarm: Swarm, address: str | None) -> tuple[list[Any], set[str] | None]:
    """The agents to watch for their return, and the names of those staying (None: no
    address, every agent watched)."""
    if address is None:
        return list(swarm.agents), None
    on = [a for a in swarm.agents if a.engine.connected and a.link.address == address]
    staying = {a.name for a in swarm.agents if a.engine.connected and a.link.address != address}
    return on, staying


class _Follow:
    """One `follow`: each agent's history mark for a pair, and which agents removed it since."""

    def __init__(self, ident: int, pair: tuple[str, str], swarm: Swarm) -> None:
        self.ident = ident
        self.pair = pair
        self._agents = swarm.agents
        self._marks = [len(agent.enforcer.history) for agent in self._agents]
        # Indexes of the agents not yet seen removing the pair: only those are looked at again.
        self._waiting = list(range(len(self._agents)))
        self._last: float | None = None
        self._said: tuple[int, int] | None = None

    def poll(self) -> dict[str, object] | None:
        """The message to say, when the counts changed since the last one."""
        still = []
        for i in self._waiting:
            stamps = [
                at
                for at, op, what in self._agents[i].enforcer.history[self._marks[i] :]
                if op == "remove" and what == self.pair
            ]
            if not stamps:
                still.append(i)
            elif self._last is None or max(stamps) > self._last:
                self._last = max(stamps)
        self._waiting = still
        in_force = sum(self.pair in agent.enforcer.in_force for agent in self._agents)
        counts = (in_force, len(self._agents) - len(still))
        if counts == self._said:
            return None
        self._said = counts
        return {
            "follow": self.ident,
            "in_force": counts[0],
            "removed": counts[1],
            "last": self._last,
        }


async def main(
    target: str, credentials: Path, prefix: str, first: int, count: int, ca_pem: bytes | None = None
) -> None:
    downs = LinkDowns()
    link_log = logging.getLogger("agent.rpc.link")
    link_log.setLevel(logging.WARNING)
    link_log.addHandler(downs)
    link_log.propagate = False
    swarm = Swarm(
        SwarmSettings(
            target=target,
            join_token=os.environ[JOIN_ENV],
            count=count,
            credentials_dir=credentials,
            prefix=prefix,
            first=first,
            backoff_base=defaults.BACKOFF_BASE,
            backoff_cap=defaults.BACKOFF_CAP,
            heartbeat=30.0,
            keepalive_time=60.0,
            keepalive_timeout=20.0,
            welcome_timeout=60.0,
            ca_pem=ca_pem,
        )
    )
    drops = _count_drops(swarm)
    links = asyncio.create_task(run_links(swarm))
    queue: asyncio.Queue[str] = asyncio.Queue()
    reader = asyncio.create_task(_commands(queue))
    connected = -1
    since: datetime | None = None
    pending = list(swarm.agents)
    staying: set[str] | None = None
    watched = count
    back = -1
    said_done = False
    follow: _Follow | None = None
    try:
        while True:
            try:
                command = queue.get_nowait()
            except asyncio.QueueEmpty:
                command = ""
            if command == "quit":
                return
            if command.startswith("watch "):
                words = command.split()
                since = datetime.fromtimestamp(int(words[1]) / 1000, UTC)
                pending, staying = _split(swarm, words[2] if len(words) > 2 else None)
                _say({"watching": len(pending), "staying": len(staying or ())})
                watched = len(pending)
                back = -1
                said_done = False
                downs.count = downs.pushed_back = 0
                downs.reasons.clear()
                drops.clear()
            if command == "report":
                counted = staying if staying is not None else {a.name for a in swarm.agents}
                _say(
                    {
                        "report": True,
                        "connected": sum(
                            a.engine.connected for a in swarm.agents if a.name in counted
                        ),
                        "dropped": sum(1 for name in drops if name in counted),
                        "stream_ends": sum(n for name, n in drops.items() if name in counted),
                        "reasons": dict(downs.reasons),
                    }
                )
            if command.startswith("follow "):
                ident, subject, action = command.split()[1:4]
                follow = _Follow(int(ident), (subject, action), swarm)
            if follow is not None and (said := follow.poll()) is not None:
                _say(said)
            now = swarm.connected()
            if now != connected:
                connected = now
                _say({"connected": now})
            if since is not None and not said_done:
                still = []
                for agent in pending:
                    # Back: connected, with contact noted after the restart began (the Welcome
                    # from the new process). Only those not yet seen back are looked at.
                    if not agent.engine.connected:
                        still.append(agent)
                        continue
                    contact = (await agent.store.meta()).last_contact_at
                    if contact is None or contact <= since:
                        still.append(agent)
                pending = still
                if watched - len(pending) != back:
                    back = watched - len(pending)
                    _say({"back": back, "at": time.monotonic()})
                if not pending:
                    said_done = True
                    _say({"done": True, "downs": downs.count, "pushed_back": downs.pushed_back})
            if links.done():
                links.result()  # the links ended: say why
                return
            await asyncio.sleep(TICK)
    finally:
        reader.cancel()
        links.cancel()
        await asyncio.gather(links, return_exceptions=True)


if __name__ == "__main__":
    target, credentials, prefix, first, count = sys.argv[1:6]
    ca_pem = Path(sys.argv[6]).read_bytes() if len(sys.argv) > 6 else None
    asyncio.run(main(target, Path(credentials), prefix, int(first), int(count), ca_pem))


class SwarmProcesses:
    """The parent's side: children each running a share of a fleet."""

    def __init__(self, logs: Path) -> None:
        self._logs = logs
        self._children: list[asyncio.subprocess.Process] = []
        self._readers: list[asyncio.Task[None]] = []
        self.connected: list[int] = []
        # (monotonic time, child, agents of that child back), in the order read.
        self.back: list[tuple[float, int, int]] = []
        self.done: dict[int, dict[str, object]] = {}
        self.reports: dict[int, dict[str, int]] = {}
        # Per child, the agents its last `watch` watched and (with an address) those staying.
        self.watching: dict[int, dict[str, int]] = {}
        self.report_reasons: dict[int, Counter[str]] = {}
        # The "link down" reasons of the last `report`'s children, summed.
        self.reasons: Counter[str] = Counter()
        # Each child's latest `follow` message.
        self.follows: dict[int, dict[str, Any]] = {}

    @property
    def pids(self) -> list[int]:
        return [child.pid for child in self._children]

    async def start(
        self,
        targets: str,
        join_token: str,
        credentials: Path,
        count: int,
        processes: int,
        prefix: str = "swarm",
        ca_file: Path | None = None,
    ) -> list[int]:
        """`count` agents `{prefix}-00000`... over `processes` more children; returns their
        indexes. With `ca_file` (the coordinator's CA) they enroll with CSRs and use mTLS."""
        share, extra = divmod(count, processes)
        first = 0
        started = []
        tls = [str(ca_file)] if ca_file is not None else []
        for k in range(processes):
            size = share + (1 if k < extra else 0)
            started.append(
                await self._spawn(targets, join_token, credentials, prefix, first, size, tls)
            )
            first += size
        return started

    async def _spawn(
        self,
        targets: str,
        join_token: str,
        credentials: Path,
        prefix: str,
        first: int,
        count: int,
        tls: list[str],
    ) -> int:
        i = len(self._children)
        log = (self._logs / f"swarm-{i}.log").open("ab")
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.swarmproc", targets, str(credentials), prefix,
            str(first), str(count), *tls,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
            env={**os.environ, JOIN_ENV: join_token},
        )  # fmt: skip
        log.close()
        self._children.append(child)
        self.connected.append(0)
        self._readers.append(asyncio.create_task(self._read(i, child)))
        return i

    async def _read(self, index: int, child: asyncio.subprocess.Process) -> None:
        assert child.stdout is not None
        async for line in child.stdout:
            message = json.loads(line)
            if "follow" in message:
                self.follows[index] = message
            elif message.get("report"):
                self.reports[index] = {
                    k: int(v) for k, v in message.items() if k not in ("report", "reasons")
                }
                self.report_reasons[index] = Counter(message.get("reasons", {}))
            elif "watching" in message:
                self.watching[index] = {k: int(v) for k, v in message.items()}
            elif "connected" in message:
                self.connected[index] = int(message["connected"])
            elif "back" in message:
                self.back.append((float(message["at"]), index, int(message["back"])))
            elif message.get("done"):
                self.done[index] = message

    def _alive(self) -> None:
        for i, child in enumerate(self._children):
            if child.returncode is not None:
                raise RuntimeError(f"swarm process {i} exited ({self._logs}/swarm-{i}.log)")

    async def until(self, done: Callable[[], bool], within: float, what: str) -> float:
        started = time.monotonic()
        while not done():
            self._alive()
            if time.monotonic() - started > within:
                raise TimeoutError(f"swarm processes: not {what} after {within:.0f} s")
            await asyncio.sleep(TICK)
        return time.monotonic() - started

    async def _tell(self, line: str, children: Sequence[int] | None = None) -> None:
        for i in range(len(self._children)) if children is None else children:
            stdin = self._children[i].stdin
            assert stdin is not None
            stdin.write(line.encode() + b"\n")
            await stdin.drain()

    async def watch(
        self, since: datetime, children: Sequence[int] | None = None, address: str = ""
    ) -> dict[str, int]:
        """From now on count the agents back after `since`, and the streams that end; with
        `address`, only the agents connected to it now are watched for their return, and the
        streams that end are those of the agents connected elsewhere. Returns how many agents
        are watched and staying, summed."""
        indexes = list(range(len(self._children))) if children is None else list(children)
        for i in indexes:
            self.watching.pop(i, None)
        await self._tell(f"watch {int(since.timestamp() * 1000)} {address}".rstrip(), indexes)
        await self.until(lambda: all(i in self.watching for i in indexes), 30.0, "watching")
        return {key: sum(self.watching[i][key] for i in indexes) for key in ("watching", "staying")}

    async def report(self, children: Sequence[int]) -> dict[str, int]:
        """The children's counts now (connected, dropped, stream_ends), summed."""
        for i in children:
            self.reports.pop(i, None)
        await self._tell("report", children)
        await self.until(lambda: all(i in self.reports for i in children), 30.0, "reported")
        self.reasons = Counter()
        for i in children:
            self.reasons.update(self.report_reasons.get(i, {}))
        return {
            key: sum(self.reports[i][key] for i in children)
            for key in ("connected", "dropped", "stream_ends")
        }

    async def follow(self, ident: int, pair: tuple[str, str]) -> None:
        """Every child marks its agents' enforcer histories now and follows `pair` (`follow`
        in the module's docstring); returns once each has said so. `ident` must be new."""
        await self._tell(f"follow {ident} {pair[0]} {pair[1]}")
        await self.until(
            lambda: all(
                self.follows.get(i, {}).get("follow") == ident for i in range(len(self._children))
            ),
            30.0,
            "following",
        )

    def followed(self) -> tuple[int, int, float | None]:
        """Over all children, for the latest `follow`: agents with the pair in force, agents
        that removed it since the mark, and the latest removal's `time.monotonic()` (None:
        none yet)."""
        states = list(self.follows.values())
        stamps = [float(m["last"]) for m in states if m.get("last") is not None]
        return (
            sum(int(m["in_force"]) for m in states),
            sum(int(m["removed"]) for m in states),
            max(stamps) if stamps else None,
        )

    def agents_back(self, children: Sequence[int] | None = None) -> int:
        """Agents back now (the latest count of each child of `children`, default all)."""
        last: dict[int, int] = {}
        for _, child, back in self.back:
            last[child] = back
        return sum(n for i, n in last.items() if children is None or i in children)

    def marks(
        self, total: int, percents: Sequence[int], children: Sequence[int] | None = None
    ) -> dict[int, float]:
        """The monotonic time at which each percentage of `total` was back, counting the agents
        of `children` (default: all) (nan: never)."""
        by_child = [0] * len(self._children)
        marks = dict.fromkeys(percents, math.nan)
        counted = set(range(len(self._children)) if children is None else children)
        for at, child, back in sorted(e for e in self.back if e[1] in counted):
            by_child[child] = back
            now = sum(by_child)
            for pct in percents:
                if math.isnan(marks[pct]) and now * 100 >= pct * total:
                    marks[pct] = at
        return marks

    async def stop(self) -> None:
        for child in self._children:
            if child.returncode is None and child.stdin is not None:
                with contextlib.suppress(ConnectionError):
                    child.stdin.write(b"quit\n")
                    child.stdin.close()
        for child in self._children:
            try:
                await asyncio.wait_for(child.wait(), 20)
            except TimeoutError:
                child.kill()
                await child.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
