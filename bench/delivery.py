"""Scenario 12, delivery keeps up or pushes back (issue 16, item 5): many SDK callers create
auto-approved short grants as fast as they can against a few real agent processes. Measured:
grants applied per second per agent, how long delivery took (from the grant's creation to its
apply on the host, both by the coordinator's clock), the calls refused with a retry hint, and
the share of grants answered "created" that expired before their agent applied them (target:
none)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from datetime import timedelta
from pathlib import Path

from jitmesh import Client
from jitmesh.errors import RateLimitedError
from jitmesh.types import Grant

from .procs import Child, DevCoordinator, bin_path, cpu_seconds, free_port, spawn
from .stats import Scenario, percentile

REAL = (
    "real: jitmesh-coordinator dev process, real jitmesh-agent processes (SQLite lease table, "
    "file enforcer), SDK callers in the bench process (each refusal waited out as hinted)"
)


async def delivery(
    tmp: Path,
    *,
    agents: int,
    callers: int,
    seconds: float,
    grant: timedelta,
    profiled: Callable[[int, str, Path], AbstractContextManager[None]],
) -> Scenario:
    scenario = Scenario(
        "12 delivery",
        f"{callers} callers x {seconds:.0f} s, {grant.total_seconds():.0f} s grants, "
        f"{agents} agents",
        REAL,
    )
    started = time.monotonic()
    coord = DevCoordinator(tmp / "coordinator", free_port())
    children: list[Child] = []
    clients: list[Client] = []
    try:
        await coord.start()
        names = [f"flood-{k}" for k in range(agents)]
        for name in names:
            access = tmp / f"{name}-access"
            access.mkdir()
            argv = [
                bin_path("jitmesh-agent"), "--coordinator", coord.address, "--name", name,
                "--label", "env=staging", "--join-token", coord.join_token,
                "--state", str(tmp / name), "--enforcer", f"file:{access}",
                "--log-level", "warning", "--insecure",
            ]  # fmt: skip
            children.append(spawn(argv, tmp / f"{name}.log"))
        admin = await Client.connect(coord.address, token=coord.token("admin"), insecure=True)
        clients.append(admin)

        async def all_connected() -> bool:
            listed = await admin.list_agents()
            return sum(1 for a in listed if a.connected and a.name in names) == len(names)

        await _until(all_connected, 60, "flood agents connected")
        # A few channels, as a fleet of callers would have; no SDK retries, so every refusal is
        # counted here (and then waited out as its hint says, as the SDK would).
        for _ in range(4):
            clients.append(
                await Client.connect(
                    coord.address, token=coord.token("alice"), insecure=True, pushback_wait=0
                )
            )
        alices = clients[1:]
        accepted: list[Grant] = []
        refusals: list[float] = []
        picks = itertools.cycle(names)
        cpu0 = cpu_seconds(coord.pid)
        t0 = time.monotonic()
        stop = t0 + seconds

        async def caller(client: Client) -> None:
            while time.monotonic() < stop:
                try:
                    _, made = await client.create_request(
                        agent=next(picks), action="deploy", duration=grant
                    )
                except RateLimitedError as exc:
                    refusals.append(exc.retry_after or 0.0)
                    await asyncio.sleep(exc.retry_after or 0.1)
                    continue
                assert made is not None
                accepted.append(made)

        with (
            profiled(children[0].pid, "delivery-agent", tmp),
            profiled(coord.pid, "delivery-coordinator", tmp),
        ):
            await asyncio.gather(*(caller(alices[i % len(alices)]) for i in range(callers)))
        offered_for = time.monotonic() - t0
        cpu = cpu_seconds(coord.pid) - cpu0
        # Every accepted grant is applied or has ended by now plus its duration.
        ids = {g.id for g in accepted}

        async def settled() -> bool:
            done = await _settled(admin, ids)
            return len(done) == len(ids)

        await _until(settled, grant.total_seconds() + 60, "accepted grants applied or ended")
        final = await _settled(admin, ids)
        _rows(scenario, accepted, final, refusals, offered_for, names, cpu)
    finally:
        for client in clients:
            await client.close()
        for child in children:
            child.stop()
        coord.stop()
    scenario.seconds = time.monotonic() - started
    return scenario


async def _until(done: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    # Polling on purpose: the state lives in other processes.
    limit = time.monotonic() + within
    while not await done():
        if time.monotonic() > limit:
            raise TimeoutError(f"not {what} after {within:.0f} s")
        await asyncio.sleep(0.2)


async def _settled(admin: Client, ids: set[str]) -> dict[str, Grant]:
    """The accepted grants that were applied (applied_at set) or have ended without it."""
    out: dict[str, Grant] = {}
    for g in await admin.list_grants(subject="alice"):
        if g.id in ids and (g.applied_at is not None or g.ended_at is not None):
            out[g.id] = g
    return out


def _rows(
    s: Scenario,
    accepted: Sequence[Grant],
    final: dict[str, Grant],
    refusals: Sequence[float],
    seconds: float,
    names: Sequence[str],
    cpu: float,
) -> None:
    applied = [g for g in final.values() if g.applied_at is not None]
    lost = len(accepted) - len(applied)
    waits = [(g.applied_at - g.created_at).total_seconds() * 1000 for g in applied if g.applied_at]
    per_agent = []
    for name in names:
        mine = [g for g in applied if g.agent == name and g.applied_at is not None]
        if len(mine) > 1:
            first = min(g.created_at for g in mine)
            last = max(g.applied_at for g in mine if g.applied_at is not None)
            per_agent.append(len(mine) / max(1e-3, (last - first).total_seconds()))
    s.add("grants accepted per second", len(accepted) / seconds, unit="/s")
    s.add("applied per second per agent (mean)", _mean(per_agent), unit="/s")
    s.add("delivery p50", percentile(waits, 50), unit="ms")
    s.add("delivery p99", percentile(waits, 99), unit="ms")
    s.add(
        "accepted, expired undelivered",
        100.0 * lost / max(1, len(accepted)),
        unit="%",
        target="0 %",
        note="grants the coordinator answered 'created' for that ended before their agent "
        "applied them",
    )
    s.add(
        "create calls refused with a retry hint",
        float(len(refusals)),
        unit="calls",
        note="RESOURCE_EXHAUSTED: the agent would not have applied the grant in time; the "
        "caller waited the hint and asked again (nothing was written)",
    )
    s.add("coordinator CPU per accepted grant", 1000 * cpu / max(1, len(accepted)), unit="ms")
    s.extra.update(
        accepted=len(accepted),
        applied=len(applied),
        expired_undelivered=lost,
        refused=len(refusals),
        retry_hint_p50_s=percentile(list(refusals), 50),
        per_agent_rates=per_agent,
    )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
