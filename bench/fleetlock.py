"""Scenario 20, whole-fleet lock: what one lock naming no agent costs the store and the
coordinator (issue 11). Such a lock writes a LOCK command into the log of every agent (lifting it,
an UNLOCK), in the transaction that creates (lifts) the lock: on SQLite that transaction holds the
one writer, on PostgreSQL the audit head, and every other write waits for it.

Per round, on a fleet of N enrolled agents (no grants: the lock commands alone; the revokes a lock
also writes are scenario 3's), `LockService.create` then `LockService.lift`, each timed four ways:
the write transaction from BEGIN to COMMIT (the store's own measure, what other writes wait for),
the call, the process CPU (event loop and the store's thread), and the longest wait of a probe
that writes one small transaction after another all along (how long another write really waited).
Also the event loop's longest stall (a 1 ms ticker), since everything else in the coordinator
(streams, reads) waits on the loop meanwhile. Baseline: plain sqlite3 on a file in WAL mode, one
INSERT per agent into a commands-shaped table and one UPDATE of its agent's sequence number, one
transaction.

    scripts/bench --only 20 [--quick] [--agents N]
    python -m bench.fleetlock [--agents 10000] [--rounds 3] [--store sqlite|postgresql] [--dsn ..]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jitmesh.clock import SystemClock
from jitmesh.types import LockTarget
from server.domain.hub import Hub
from server.domain.locks import LockService
from server.domain.models import ADMIN_GROUP, Principal
from server.rpc.agentlink import LinkRegistry
from server.store.sqlite import SqliteStore

from .stats import Scenario

MS = 1000.0
ADMIN = Principal("admin", frozenset({ADMIN_GROUP}))
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
REAL = (
    "real: SqliteStore + LockService (the coordinator's code) in the bench process, N enrolled "
    "agents, no streams; a probe writing small transactions all along; baseline: plain sqlite3 "
    "(WAL file), one INSERT and one seq UPDATE per agent, one transaction"
)


@dataclass
class _Step:
    """One create or lift."""

    transaction: float = 0.0
    # The median of the call's write transactions (one, or the lock's and its handout steps).
    typical: float = 0.0
    transactions: int = 0
    call: float = 0.0
    cpu: float = 0.0
    waited: float = 0.0
    stall: float = 0.0


@dataclass
class Figures:
    agents: int
    create: list[_Step] = field(default_factory=list)
    lift: list[_Step] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def worst(steps: list[_Step], name: str) -> float:
            return round(max(float(getattr(s, name)) for s in steps) * MS, 1)

        def typical(steps: list[_Step], name: str) -> float:
            return round(statistics.median(float(getattr(s, name)) for s in steps) * MS, 1)

        out: dict[str, Any] = {"agents": self.agents, "rounds": len(self.create)}
        for what, steps in (("create", self.create), ("lift", self.lift)):
            out[f"{what}_transactions"] = max(s.transactions for s in steps)
            for name in ("transaction", "typical", "call", "cpu", "waited", "stall"):
                out[f"{what}_{name}_ms"] = typical(steps, name)
                out[f"{what}_{name}_max_ms"] = worst(steps, name)
        if self.baseline:
            out["baseline_ms"] = round(statistics.median(self.baseline) * MS, 1)
        return out


class _Probe:
    """Small write transactions one after another (an agent seen, as heartbeats and Hellos
    write), each timed from asking for the writer to commit."""

    def __init__(self, store: Any, agent: str) -> None:
        self._store = store
        self._agent = agent
        self.waits: list[tuple[float, float]] = []  # (started, seconds)

    async def run(self) -> None:
        while True:
            began = time.perf_counter()
            async with self._store.transaction() as tx:
                await tx.agent_seen(self._agent, datetime.now(UTC))
            self.waits.append((began, time.perf_counter() - began))
            await asyncio.sleep(0.002)

    def longest(self, since: float) -> float:
        return max((w for began, w in self.waits if began >= since), default=0.0)

    def commits(self, since: float) -> int:
        """The probe's transactions that committed after `since` (those begun just before it
        too: their commit fell in the window)."""
        return sum(1 for began, w in self.waits if began + w >= since)


class _Ticker:
    """The event loop's longest stall: a 1 ms sleep that woke late."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    async def run(self) -> None:
        while True:
            began = time.perf_counter()
            await asyncio.sleep(0.001)
            self.marks.append((began, time.perf_counter() - began - 0.001))

    def longest(self, since: float) -> float:
        return max((late for began, late in self.marks if began >= since), default=0.0)


async def enroll(store: Any, agents: int) -> None:
    names = [f"agent-{i:05d}" for i in range(agents)]
    for first in range(0, agents, 5000):
        async with store.transaction() as tx:
            for name in names[first : first + 5000]:
                await tx.enroll_agent(name, {"env": "prod"}, f"hash-{name}", datetime.now(UTC))


async def measure(store: Any, agents: int, rounds: int) -> Figures:
    """`rounds` whole-fleet locks, each created and lifted, on `store` with `agents` enrolled."""
    await enroll(store, agents)
    transactions: list[float] = []
    store.observe_transaction = transactions.append
    locks = LockService(store, LinkRegistry(), Hub(), SystemClock())
    figures = Figures(agents)
    probe, ticker = _Probe(store, "agent-00000"), _Ticker()
    async with _running(probe.run(), ticker.run()):
        await asyncio.sleep(0.05)  # both going
        for n in range(rounds):
            made: list[str] = []

            async def create(n: int = n, made: list[str] = made) -> None:
                lock, _, _ = await locks.create(
                    ADMIN, LockTarget(subject=f"suspect-{n}"), "bench: whole fleet", None
                )
                made.append(lock.id)

            async def lift(made: list[str] = made) -> None:
                await locks.lift(ADMIN, made[0], "bench")

            for steps, work in ((figures.create, create), (figures.lift, lift)):
                steps.append(await _timed(work, transactions, probe, ticker))
                await asyncio.sleep(0.05)  # let the probe and the ticker run in between
    store.observe_transaction = None
    return figures


async def _timed(
    work: Callable[[], Awaitable[None]], transactions: list[float], probe: _Probe, ticker: _Ticker
) -> _Step:
    transactions.clear()
    began = time.perf_counter()
    cpu = time.process_time()
    await work()
    step = _Step(call=time.perf_counter() - began, cpu=time.process_time() - cpu)
    # The probe's write that waited behind the lock's commits after it: give it the time.
    await asyncio.sleep(0.02)
    # The probe's transactions (one row each) are the shortest: the longest is the lock's (or
    # one of its steps'); without the probe's, the rest are the call's.
    step.transaction = max(transactions, default=0.0)
    mine = sorted(transactions)[probe.commits(began) :]
    step.typical = statistics.median(mine) if mine else 0.0
    step.transactions = len(mine)
    step.waited = probe.longest(began)
    step.stall = ticker.longest(began)
    return step


@contextlib.asynccontextmanager
async def _running(*coros: Awaitable[None]) -> AsyncIterator[None]:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def baseline(path: Path, agents: int) -> float:
    """Plain sqlite3: the same rows, one transaction."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS a (name TEXT PRIMARY KEY, last_seq INTEGER)")
    db.execute(
        "CREATE TABLE IF NOT EXISTS c (agent TEXT, seq INTEGER, kind TEXT, ref TEXT, "
        "at INTEGER, PRIMARY KEY (agent, seq)) WITHOUT ROWID"
    )
    names = [f"agent-{i:05d}" for i in range(agents)]
    db.executemany("INSERT OR IGNORE INTO a VALUES (?, 0)", ((n,) for n in names))
    began = time.perf_counter()
    db.execute("BEGIN IMMEDIATE")
    seqs = db.execute("UPDATE a SET last_seq = last_seq + 1 RETURNING name, last_seq").fetchall()
    db.executemany(
        "INSERT INTO c VALUES (?, ?, 'lock', 'lck-x', 0)", ((name, seq) for name, seq in seqs)
    )
    db.execute("COMMIT")
    elapsed = time.perf_counter() - began
    db.close()
    return elapsed


async def run(tmp: Path, sizes: Any) -> list[Scenario]:
    """For scripts/bench: `sizes.agents` agents (1,000 quick, 10,000 full), SQLite."""
    agents, rounds = sizes.agents, 3
    started = time.monotonic()
    store = await SqliteStore.open(tmp / "fleetlock" / "coordinator.db")
    try:
        figures = await measure(store, agents, rounds)
    finally:
        await store.close()
    for _ in range(rounds):
        figures.baseline.append(baseline(tmp / "baseline.db", agents))
    s = figures.summary()
    scenario = Scenario(
        "20 whole-fleet lock",
        f"{agents:,} agents, {rounds} rounds (create and lift), no grants",
        REAL,
        extra=s,
    )
    b = s["baseline_ms"]
    scenario.add(
        f"lock: longest transaction, {agents:,} agents",
        s["create_transaction_ms"],
        b,
        target="<= 100 ms (10,000)",
        note="BEGIN to COMMIT of the lock's longest write transaction (the lock's own, or a "
        "step of its handout; median of the rounds): what every other write waits for at worst; "
        "the baseline writes all the rows in one transaction",
    )
    scenario.add(f"lock: transactions, {agents:,}", s["create_transactions"], unit="count")
    scenario.add(f"lock: another write waited (max), {agents:,}", s["create_waited_max_ms"])
    scenario.add(f"lock: event loop stalled (median), {agents:,}", s["create_stall_ms"])
    scenario.add(f"lock: call, {agents:,}", s["create_call_ms"])
    scenario.add(f"lock: process CPU, {agents:,}", s["create_cpu_ms"])
    scenario.add(f"lift: longest transaction, {agents:,}", s["lift_transaction_ms"], b)
    scenario.add(f"lift: another write waited (max), {agents:,}", s["lift_waited_max_ms"])
    scenario.seconds = time.monotonic() - started
    return [scenario]


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fleetlock")
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    args = parser.parse_args()
    result: dict[str, Any] = {"store": args.store}
    if args.store == "sqlite":
        with tempfile.TemporaryDirectory() as root:
            store = await SqliteStore.open(Path(root) / "bench.db")
            try:
                result |= (await measure(store, args.agents, args.rounds)).summary()
            finally:
                await store.close()
            result["baseline_ms"] = round(baseline(Path(root) / "base.db", args.agents) * MS, 1)
    else:
        import psycopg

        from server.store.postgres import PostgresStore, with_schema

        schema = "bench_fleetlock_" + secrets.token_hex(4)
        async with await psycopg.AsyncConnection.connect(args.dsn, autocommit=True) as conn:
            await conn.execute(f"CREATE SCHEMA {schema}")
        try:
            pg = await PostgresStore.open(with_schema(args.dsn, schema))
            try:
                result |= (await measure(pg, args.agents, args.rounds)).summary()
            finally:
                await pg.close()
        finally:
            async with await psycopg.AsyncConnection.connect(args.dsn, autocommit=True) as conn:
                await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
