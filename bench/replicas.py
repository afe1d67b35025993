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
import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg

from jitmesh import Client
from server.shared import new_key
from server.store.postgres import with_schema
from tests.support.swarm import Swarm, SwarmSettings

from .procs import DevCoordinator, cpu_seconds, free_port
from .scenarios import (
    HOUR,
    MS,
    Sizes,
    _fanout_round,
    _profiled,
    _say,
    _SwarmEnforcers,
    _throughput,
)
from .stats import Scenario, median, percentile
from .swarmproc import SwarmProcesses, run_links

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

    async def start_coordinators(self) -> None:
        for coord in self.coords:  # one after the other: the first makes the shared keys
            await coord.start()

    async def start(self, agents: int, *, fail_over: bool = False) -> None:
        """Start the replicas and a swarm for each; with `fail_over`, every agent is given
        all replicas' addresses, its own first (as a real agent's --coordinator A,B)."""
        await self.start_coordinators()
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


def _postgres_cpu() -> dict[int, float]:
    """CPU seconds used so far by each process named postgres on this machine (the local
    server's backends, its writer and checkpointer), by pid."""
    used: dict[int, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() == "postgres":
                used[int(proc.name)] = cpu_seconds(int(proc.name))
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
    return used


def _postgres_cpu_since(before: dict[int, float]) -> float:
    """CPU used since `before` by the postgres processes running now (a backend that ended
    meanwhile, e.g. the killed replica's, takes its last seconds with it)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in _postgres_cpu().items())


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
                        _SwarmEnforcers(setup.agents),
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


# Swarm processes per replica in scenario 17.
FAILOVER_PROCESSES = 2
REAL_FAILOVER = (
    "two `jitmesh-coordinator dev --store postgresql://` processes on one database (local "
    f"PostgreSQL 15); swarm agents in {2 * FAILOVER_PROCESSES} processes (bench/swarmproc.py: "
    "real Link + Engine, the real agents' reconnect schedule), half on each replica, each given "
    "both addresses (its own first); no baseline"
)


async def failover(tmp: Path, sizes: Sizes) -> list[Scenario]:
    """Scenario 17: SIGKILL the replica holding half the agents; the seconds until each of
    them is served by the other replica (a Welcome from it after the kill). The agents run in
    `FAILOVER_PROCESSES` processes per replica (bench/swarmproc.py) on the real agents'
    reconnect schedule, each given both addresses, its own replica's first."""
    n = sizes.agents
    half = n // 2
    scenario = Scenario("17 failover, 2 replicas", f"{n} agents, {half} on the killed replica",
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
    parts = SwarmProcesses(setup.root)
    try:
        _say(f"failover: two replicas on PostgreSQL, {n} agents in swarm processes")
        await setup.start_coordinators()
        survivor_coord, victim_coord = setup.coords
        survivors = await parts.start(
            f"{survivor_coord.address},{victim_coord.address}", survivor_coord.join_token,
            setup.root / "credentials-0", half, FAILOVER_PROCESSES, prefix="r0-agent",
        )  # fmt: skip
        victims = await parts.start(
            f"{victim_coord.address},{survivor_coord.address}", victim_coord.join_token,
            setup.root / "credentials-1", half, FAILOVER_PROCESSES, prefix="r1-agent",
        )  # fmt: skip
        connect_s = await parts.until(
            lambda: sum(parts.connected) >= 2 * half, max(120.0, n / 20), f"{n} connected"
        )
        scenario.extra["first_connect_and_enroll_s"] = connect_s
        killed_at = datetime.now(UTC)
        # From here on, each process watches its agents connected to the replica about to be
        # killed (an agent is on whichever replica served it last: an address that failed
        # during the first connection moved it on) and counts the streams of the others that
        # end (the report answers once the watch is taken).
        everyone = survivors + victims
        split = await parts.watch(killed_at, everyone, address=victim_coord.address)
        moving, staying = split["watching"], split["staying"]
        scenario.extra["on_the_killed_replica"] = moving
        scenario.extra["on_the_other_replica"] = staying
        scenario.extra["first_address_killed"] = half
        await parts.report(everyone)
        # With --profile: the replica that stays, while the agents move to it.
        with _profiled(survivor_coord.pid, "failover", tmp):
            cpu0 = cpu_seconds(survivor_coord.pid)
            swarm0 = sum(cpu_seconds(pid) for pid in parts.pids)
            database0 = _postgres_cpu()
            t_kill = time.monotonic()
            victim_coord.kill()
            with contextlib.suppress(TimeoutError):
                await parts.until(
                    lambda: all(i in parts.done for i in everyone), 60.0, "all moved agents served"
                )
            cpu = cpu_seconds(survivor_coord.pid) - cpu0
            swarm = sum(cpu_seconds(pid) for pid in parts.pids) - swarm0
            database = _postgres_cpu_since(database0)
            elapsed = time.monotonic() - t_kill
        marks = parts.marks(moving, (50, 90, 99, 100), everyone)
        for pct, at in marks.items():
            scenario.add(
                f"{pct} % served by the other replica", (at - t_kill) * MS, unit="ms",
                target="<= 10 s" if pct == 100 else "",
            )  # fmt: skip
        stayed = await parts.report(everyone)
        back = parts.agents_back(everyone)
        scenario.add(
            "agents on the killed replica", float(moving), unit="agents",
            note="connected to the replica SIGKILLed at that moment, whatever their first "
            f"address (the killed replica's address is first for {half})",
        )  # fmt: skip
        scenario.add("left behind", float(moving - back), unit="agents", target="0")
        scenario.add(
            "other replica's CPU per moved agent", cpu / max(1, back) * MS, unit="ms",
            note="user + system CPU of the replica that stayed, from the SIGKILL until the last "
            f"moved agent was served, per agent moved ({elapsed:.1f} s elapsed, "
            f"{os.cpu_count()} cores shared with PostgreSQL and the swarm processes)",
        )  # fmt: skip
        scenario.add(
            "swarm CPU, kill until all moved", swarm, unit="s",
            note=f"the {2 * FAILOVER_PROCESSES} swarm processes' CPU over the same time",
        )  # fmt: skip
        scenario.add(
            "PostgreSQL CPU, kill until all moved", database, unit="s",
            note="every postgres process's CPU over the same time; with the replica's and the "
            f"swarm's, against {os.cpu_count()} cores x the elapsed time, it shows whether this "
            "machine bounded the figure",
        )  # fmt: skip
        scenario.extra["elapsed_s"] = elapsed
        scenario.extra["other_replica_cpu_s"] = cpu
        scenario.add(
            "other replica's agents disconnected during failover", float(stayed["dropped"]),
            unit="agents", target="0",
            note="agents connected to the replica that stayed up at the SIGKILL whose stream "
            "ended at any moment from then until the last moved agent was served (every "
            "connected -> lost transition of each engine counted, not sampled)",
        )  # fmt: skip
        scenario.extra["other_replica_stream_ends"] = stayed["stream_ends"]
        # Why links went down (the links' own "link down" reasons, all agents, since the kill).
        scenario.extra["down_reasons"] = dict(parts.reasons)
        scenario.add(
            "other replica's agents disconnected at the end",
            float(staying - stayed["connected"]), unit="agents", target="0",
        )  # fmt: skip
        scenario.extra["measured_from"] = "SIGKILL of the second replica"
        scenario.extra["swarm_processes"] = 2 * FAILOVER_PROCESSES
    except Exception as exc:  # reported; what was measured stays
        if not scenario.rows:
            scenario.error = f"{type(exc).__name__}: {exc}"
    finally:
        await parts.stop()
        await setup.stop()
        async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    scenario.seconds = time.monotonic() - started
    return [scenario]
