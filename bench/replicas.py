"""Scenarios 9-11: two coordinator replicas on PostgreSQL, beside one coordinator on SQLite.

The same work runs on both set-ups in the same run; the "jitmesh" column is two replicas on
PostgreSQL, the "baseline" column one SQLite coordinator (a ratio above 1 is what sharing the
state costs). Each set-up gets a swarm of agents (real Link + Engine, in this process), half
held by each replica; operator calls go to the first replica, so every push to an agent of the
second replica crosses over through the shared log and NOTIFY.

- 9 push: request (auto-approved) on replica A for an agent held by replica B, until the agent
  applied it; one at a time.
- 10 fan-out: one lock on replica A revoking a grant on every agent, until the last removed it.
- 11 throughput: callers over both replicas creating auto-approved requests, until applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg

from jitmesh import Client
from server.shared import new_key
from server.store.postgres import with_schema
from tests.support.swarm import Swarm, SwarmAgent, SwarmSettings

from .procs import DevCoordinator, free_port
from .scenarios import HOUR, MS, Sizes, _fanout_round, _say, _throughput
from .stats import Scenario, median, percentile
from .swarmproc import run_links

DSN = "postgresql://postgres@127.0.0.1:5432/test"
REAL = (
    "jitmesh: two `jitmesh-coordinator dev --store postgresql://` processes on one database "
    "(local PostgreSQL 15); baseline: one `jitmesh-coordinator dev` on SQLite; swarm agents in "
    "the bench process, half on each replica; operator calls on the first replica"
)


class _SetUp:
    def __init__(self, tmp: Path, name: str, replicas: int, dsn: str = "") -> None:
        self.coords: list[DevCoordinator] = []
        self.swarms: list[Swarm] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.clients: list[Client] = []
        root = tmp / name
        root.mkdir()
        key = root / "secret.key"
        key.write_text(new_key())
        for i in range(replicas):
            extra: tuple[str, ...] = ()
            if dsn:
                extra = ("--store", dsn, "--replica", f"r{i}", "--secret-key-file", str(key))
            self.coords.append(DevCoordinator(root / f"r{i}", free_port(), extra=extra))
        self.root = root

    async def start(self, agents: int, *, fail_over: bool = False) -> None:
        """Start the replicas and a swarm for each; with `fail_over`, every agent is given
        all replicas' addresses, its own first (as a real agent's --coordinator A,B)."""
        for coord in self.coords:  # one after the other: the first makes the shared keys
            await coord.start()
        share = agents // len(self.coords)
        for i, coord in enumerate(self.coords):
            others = [c.address for c in self.coords if c is not coord] if fail_over else []
            swarm = Swarm(
                SwarmSettings(
                    target=",".join([coord.address, *others]),
                    join_token=coord.join_token,
                    count=share,
                    credentials_dir=self.root / f"credentials-{i}",
                    prefix=f"r{i}-agent",
                    labels={"env": "staging"},
                    heartbeat=30.0,
                    keepalive_time=60.0,
                    keepalive_timeout=20.0,
                    welcome_timeout=60.0,
                )
            )
            self.swarms.append(swarm)
            self.tasks.append(asyncio.create_task(run_links(swarm)))
        for swarm in self.swarms:
            await swarm.wait_connected(share, within=max(60.0, agents / 10))

    async def client(self, i: int, user: str) -> Client:
        coord = self.coords[i % len(self.coords)]
        client = await Client.connect(
            coord.address, token=coord.token(user), timeout=600, insecure=True
        )
        self.clients.append(client)
        return client

    @property
    def agents(self) -> Any:
        return SimpleNamespace(agents=[a for s in self.swarms for a in s.agents])

    async def stop(self) -> None:
        for client in self.clients:
            await client.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for coord in self.coords:
            coord.stop()


async def _push(setup: _SetUp, rounds: int) -> list[float]:
    """Seconds from the create call on replica A to the grant applied by an agent on the last
    replica (its lease's applied_at), one at a time."""
    alice = await setup.client(0, "alice")
    far = setup.swarms[-1].agents
    out: list[float] = []
    for k in range(rounds):
        agent = far[k % len(far)]
        started = datetime.now(UTC)
        _, grant = await alice.create_request(agent=agent.name, action="logs", duration=HOUR)
        assert grant is not None
        deadline = time.monotonic() + 30
        while True:
            lease = await agent.store.lease(grant.id)
            if lease is not None and lease.applied_at is not None:
                out.append((lease.applied_at - started).total_seconds())
                break
            if time.monotonic() > deadline:
                raise TimeoutError("push: grant not applied in 30 s")
            await asyncio.sleep(0.001)
    return out


async def _reachable(dsn: str) -> str:
    try:
        async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=3) as conn:
            await conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc) else type(exc).__name__
    return ""


async def run(tmp: Path, sizes: Sizes) -> list[Scenario]:
    # Two replicas and the swarm share the machine with the database: a tenth of the fleet
    # sizes, enough to show the cost of sharing the state, not the capacity of either.
    n = max(20, min(sizes.agents // 10, 1000))
    rounds = sizes.rounds * 10
    push = Scenario("9 push, 2 replicas", f"{rounds} grants across replicas", REAL)
    fanout = Scenario("10 fan-out, 2 replicas", f"{n} agents x {sizes.fanout_rounds}", REAL)
    throughput = Scenario(
        "11 throughput, 2 replicas",
        f"{sizes.callers} callers x {sizes.throughput_seconds:.0f} s over {n} agents",
        REAL,
    )
    scenarios = [push, fanout, throughput]
    started = time.monotonic()
    why = await _reachable(DSN)
    if why:
        for s in scenarios:
            s.error = f"PostgreSQL at {DSN} not reachable: {why}"
        return scenarios
    schema = "bench_" + secrets.token_hex(4)
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
        await conn.execute(f"CREATE SCHEMA {schema}")
    results: dict[str, dict[str, Any]] = {}
    try:
        for label, setup in (
            ("pg", _SetUp(tmp, "replicas-pg", 2, with_schema(DSN, schema))),
            ("sqlite", _SetUp(tmp, "replicas-sqlite", 1)),
        ):
            _say(f"replicas: {label}: starting, {n} agents")
            out: dict[str, Any] = {}
            try:
                await setup.start(n)
                out["push"] = await _push(setup, rounds)
                alices = [await setup.client(i, "alice") for i in range(4)]
                admins = [await setup.client(0, "admin")]
                names = [a.name for a in setup.agents.agents]
                times = []
                for _ in range(sizes.fanout_rounds):
                    elapsed, _ = await _fanout_round(
                        setup.coords[0].pid,
                        alices,
                        admins,
                        setup.agents,
                        names,
                        contextlib.nullcontext(),
                    )
                    times.append(elapsed)
                out["fanout"] = times
                rate, _, api = await _throughput(
                    setup.coords[0].pid,
                    alices,
                    setup.agents,
                    names,
                    sizes.callers,
                    sizes.throughput_seconds,
                )
                out["throughput"] = (rate, api)
            finally:
                await setup.stop()
            results[label] = out
        pg, lite = results["pg"], results["sqlite"]
        push.add(
            "p50", median(pg["push"]) * MS, median(lite["push"]) * MS,
            note="baseline: one SQLite coordinator (agent on the same coordinator)",
        )  # fmt: skip
        push.add("p99", percentile(pg["push"], 99) * MS, percentile(lite["push"], 99) * MS)
        fanout.add(f"all {n} revoked (median)", median(pg["fanout"]) * MS,
                   median(lite["fanout"]) * MS)  # fmt: skip
        throughput.add(
            "requests/s (create -> applied)", pg["throughput"][0], lite["throughput"][0],
            unit="/s", note="baseline: one SQLite coordinator",
        )  # fmt: skip
        throughput.add(
            "requests/s accepted by the API", pg["throughput"][1], lite["throughput"][1], unit="/s"
        )
    except Exception as exc:  # reported per scenario; what was measured stays
        for s in scenarios:
            if not s.rows:
                s.error = f"{type(exc).__name__}: {exc}"
    finally:
        async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    for s in scenarios:
        s.seconds = time.monotonic() - started
    return scenarios


def _count_drops(agents: Sequence[SwarmAgent]) -> Counter[str]:
    """From now on, counts per agent each time its engine goes from connected to lost (the
    link calls `coordinator_lost` whenever a stream ends or an attempt fails; only the calls
    while connected are an established stream ending)."""
    drops: Counter[str] = Counter()
    for agent in agents:
        engine = agent.engine
        lost = engine.coordinator_lost

        async def counted(name: str = agent.name, engine: Any = engine, lost: Any = lost) -> None:
            if engine.connected:
                drops[name] += 1
            await lost()

        # The instance attribute shadows the method: the link calls through it.
        setattr(engine, "coordinator_lost", counted)  # noqa: B010
    return drops


REAL_FAILOVER = (
    "two `jitmesh-coordinator dev --store postgresql://` processes on one database (local "
    "PostgreSQL 15); swarm agents in the bench process (real Link + Engine), half on each "
    "replica, each given both addresses (its own first); no baseline"
)


async def failover(tmp: Path, sizes: Sizes) -> list[Scenario]:
    """Scenario 17: SIGKILL the replica holding half the agents; the seconds until each of
    them is served by the other replica (a Welcome from it after the kill)."""
    n = max(20, min(sizes.agents // 10, 1000))
    scenario = Scenario("17 failover, 2 replicas", f"{n} agents, {n // 2} on the killed replica",
                        REAL_FAILOVER)  # fmt: skip
    started = time.monotonic()
    why = await _reachable(DSN)
    if why:
        scenario.error = f"PostgreSQL at {DSN} not reachable: {why}"
        return [scenario]
    schema = "bench_" + secrets.token_hex(4)
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
        await conn.execute(f"CREATE SCHEMA {schema}")
    setup = _SetUp(tmp, "failover", 2, with_schema(DSN, schema))
    try:
        _say(f"failover: two replicas on PostgreSQL, {n} agents")
        await setup.start(n, fail_over=True)
        survivor, victim = setup.swarms
        moving = victim.agents
        drops = _count_drops(survivor.agents)
        # The same count on the agents that move: each should show its one break at the kill
        # (the check that the count sees a stream ending).
        moved_drops = _count_drops(moving)
        killed_at = datetime.now(UTC)
        t_kill = time.monotonic()
        setup.coords[1].kill()
        marks = {50: math.nan, 90: math.nan, 99: math.nan, 100: math.nan}
        pending = list(moving)
        deadline = t_kill + 60.0
        while pending and time.monotonic() < deadline:
            still = []
            for agent in pending:
                contact = (await agent.store.meta()).last_contact_at
                # Served again: connected, with a Welcome after the kill (only the other
                # replica is left to give one).
                if not (contact is not None and contact > killed_at and agent.engine.connected):
                    still.append(agent)
            pending = still
            back = len(moving) - len(pending)
            now = time.monotonic()
            for pct in marks:
                if math.isnan(marks[pct]) and back * 100 >= pct * len(moving):
                    marks[pct] = now - t_kill
            await asyncio.sleep(0.05)
        for pct, at in marks.items():
            scenario.add(
                f"{pct} % served by the other replica", at * MS, unit="ms",
                target="<= 10 s" if pct == 100 else "",
            )  # fmt: skip
        scenario.add("left behind", float(len(pending)), unit="agents", target="0")
        scenario.add(
            "survivor's agents disconnected during failover", float(len(drops)), unit="agents",
            target="0",
            note="agents of the replica that stayed up whose stream ended at any moment from "
            "the SIGKILL until the last moved agent was served (every connected -> lost "
            "transition of each engine counted, not sampled)",
        )  # fmt: skip
        scenario.extra["survivor_stream_ends"] = sum(drops.values())
        scenario.extra["moved_agents_stream_ends"] = sum(moved_drops.values())
        undisturbed = len(survivor.agents) - survivor.connected()
        scenario.add(
            "survivor's own agents disconnected at the end", float(undisturbed), unit="agents",
            target="0",
        )  # fmt: skip
        scenario.extra["measured_from"] = "SIGKILL of the second replica"
    except Exception as exc:  # reported; what was measured stays
        if not scenario.rows:
            scenario.error = f"{type(exc).__name__}: {exc}"
    finally:
        await setup.stop()
        async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    scenario.seconds = time.monotonic() - started
    return [scenario]
