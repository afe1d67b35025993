"""The coordinator's record agrees with the hosts after repeated SIGKILLs (issue 9, "Done when").

Real processes: a dev coordinator and three agents with file enforcers. Grants are created,
revoked and released while the coordinator is SIGKILLed again and again, mid-burst; one agent
meets its first grants only through a snapshot. When everything has settled, four records are
compared grant by grant: each agent's lease table, its marker files, `jitctl grant list` and the
audit log. Zero disagreements."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from jitmesh import Client, GrantState, JitmeshError

from .procs import Proc, agent, coordinator, free_port, jitctl, read_env, wait_for, wait_healthy

pytestmark = pytest.mark.subprocess

ACTIONS = [f"a{i}" for i in range(12)]
POLICY = f"""\
version: 1
actions: [{", ".join(ACTIONS)}]
request_ttl: 1h
rules:
  - name: crash-test
    subjects: {{groups: [developers]}}
    actions: [{", ".join(ACTIONS)}]
    agents: {{labels: {{env: staging}}}}
    max_duration: 1h
    approval: auto
"""
AGENTS = ["web-1", "web-2", "web-3"]
SETTLED = {
    GrantState.ACTIVE,
    GrantState.REVOKED,
    GrantState.RELEASED,
    GrantState.EXPIRED,
    GrantState.FAILED,
}


@dataclass
class Host:
    name: str
    state: Path
    access: Path
    proc: Proc


def leases(host: Host) -> dict[str, dict[str, Any]]:
    """The agent's lease table, read as `jitmesh-agent check` would (read-only)."""
    db = sqlite3.connect(f"file:{host.state / 'agent.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            "SELECT grant_id, subject, action, state, applied_at_ms, not_before_ms, not_after_ms "
            "FROM leases"
        ).fetchall()
    finally:
        db.close()
    keys = ("subject", "action", "state", "applied_at_ms", "not_before_ms", "not_after_ms")
    return {r[0]: dict(zip(keys, r[1:], strict=True)) for r in rows}


async def test_the_record_agrees_with_the_hosts_after_repeated_coordinator_kills(
    tmp_path: Path,
) -> None:
    rng = random.Random(9)
    port = free_port()
    address = f"127.0.0.1:{port}"
    data = tmp_path / "coordinator"
    coord = coordinator(data, port)
    hosts: dict[str, Host] = {}
    coord.start()
    try:
        await wait_healthy(address)
        await wait_for(lambda: (data / "dev.env").exists(), 20, "dev.env")
        env = read_env(data / "dev.env")
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ADMIN"]) as admin:
            await admin.apply_policy(POLICY)

        def start(name: str) -> None:
            if name not in hosts:
                access = tmp_path / f"{name}-access"
                access.mkdir()
                state = tmp_path / name
                proc = agent(address, name, "env=staging", env["JITMESH_JOIN_TOKEN"], state, access)
                hosts[name] = Host(name, state, access, proc)
            hosts[name].proc.start()

        async def connected(names: list[str]) -> None:
            async with await Client.connect(address, token=env["JITMESH_TOKEN_ADMIN"]) as a:
                async with asyncio.timeout(60):
                    while True:
                        found = {x.name: x.connected for x in await a.list_agents()}
                        if all(found.get(n) for n in names):
                            return
                        await asyncio.sleep(0.05)

        for name in AGENTS:
            start(name)
        await connected(AGENTS)
        # web-3 enrolled and applied nothing; its first grants wait while it is down, and it
        # meets them through a snapshot (Hello with last_applied_seq 0 while commands wait).
        hosts["web-3"].proc.stop()

        created: list[str] = []
        kills = 0
        for round_ in range(4):
            async with await Client.connect(address, token=env["JITMESH_TOKEN_ALICE"]) as alice:

                async def ask(target: str, action: str, seconds: int) -> None:
                    with contextlib.suppress(JitmeshError):
                        _, grant = await alice.create_request(
                            agent=target,
                            action=action,
                            duration=timedelta(seconds=seconds),
                            reason="crash test",
                        )
                        if grant is not None:
                            created.append(grant.id)

                burst = [
                    asyncio.create_task(
                        ask(
                            rng.choice(AGENTS),
                            rng.choice(ACTIONS),
                            rng.choice([3, 600, 900]),
                        )
                    )
                    for _ in range(12)
                ]
                # Kill mid-burst: some requests committed, some pushed, some acked.
                await asyncio.wait(burst, timeout=rng.uniform(0.05, 0.4))
                coord.kill()
                kills += 1
                for task in burst:
                    with contextlib.suppress(Exception):
                        await task
            coord.start()
            await wait_healthy(address)
            if round_ == 1:
                start("web-3")
            alive = AGENTS if round_ >= 1 else AGENTS[:2]
            await connected(alive)
            # Revoke and release some live grants between kills.
            async with (
                await Client.connect(address, token=env["JITMESH_TOKEN_ADMIN"]) as admin,
                await Client.connect(address, token=env["JITMESH_TOKEN_ALICE"]) as alice,
            ):
                live = [g for g in await admin.list_grants() if g.id in created]
                for grant in rng.sample(live, min(3, len(live))):
                    with contextlib.suppress(JitmeshError):
                        if rng.random() < 0.5:
                            await admin.revoke_grant(grant.id, reason="crash test")
                        else:
                            await alice.release_grant(grant.id)

        # Settle: every grant has reached a state the agents have reported on.
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ADMIN"]) as admin:
            async with asyncio.timeout(90):
                while True:
                    grants = {g.id: g for g in await admin.list_grants(states=())}
                    # Short grants have ended too, so no expiry races the comparison.
                    soon = datetime.now(UTC) + timedelta(seconds=60)
                    if all(
                        g.state in SETTLED
                        and not (g.state is GrantState.ACTIVE and g.not_after < soon)
                        for g in grants.values()
                    ):
                        break
                    await asyncio.sleep(0.1)
            audit = await admin.list_audit(since=None)
            assert (await admin.verify_audit()).ok
        assert kills == 4
        assert len(created) >= 10

        code, out, err = await jitctl(
            "grant", "list", "--all", "-o", "json",
            env={**env, "JITMESH_TOKEN": env["JITMESH_TOKEN_ADMIN"]},
        )  # fmt: skip
        assert code == 0, err
        listed = {g["id"]: g for g in json.loads(out)}

        now_ms = int(time.time() * 1000)
        tables = {name: leases(host) for name, host in hosts.items()}
        applied_events: dict[str, int] = {}
        for event in audit:
            if event.kind == "grant.applied":
                applied_events[event.grant_id] = applied_events.get(event.grant_id, 0) + 1
        problems: list[str] = []
        for gid, grant in grants.items():
            lease = tables[grant.agent].get(gid)
            state = grant.state
            if listed.get(gid, {}).get("state", "").upper() != state.value:
                problems.append(f"{gid}: jitctl says {listed.get(gid)}, the SDK says {state}")
            held = lease is not None and lease["state"] == "active"
            host_applied = lease is not None and lease["applied_at_ms"] is not None
            if state is GrantState.ACTIVE and not held:
                problems.append(f"{gid}: ACTIVE on the coordinator, {lease} on {grant.agent}")
            if (
                held
                and state is not GrantState.ACTIVE
                and grant.not_after.timestamp() * 1000 > now_ms
            ):
                problems.append(f"{gid}: held on {grant.agent} but {state} on the coordinator")
            if (grant.applied_at is not None) != host_applied:
                problems.append(
                    f"{gid}: applied_at {grant.applied_at} on the coordinator, {lease} on the host"
                )
            if applied_events.get(gid, 0) != (1 if host_applied else 0):
                problems.append(
                    f"{gid}: {applied_events.get(gid, 0)} grant.applied events, host {lease}"
                )
        for name, host in hosts.items():
            held_pairs = {
                f"{row['subject']}:{row['action']}"
                for row in tables[name].values()
                if row["state"] == "active"
                and row["applied_at_ms"] is not None
                and row["not_before_ms"] <= now_ms < row["not_after_ms"]
            }
            markers = {p.name for p in host.access.iterdir() if not p.name.startswith(".")}
            if markers != held_pairs:
                problems.append(
                    f"{name}: markers {sorted(markers)} but leases {sorted(held_pairs)}"
                )
        snapshot_acks = [e for e in audit if e.details.get("source") == "snapshot"]
        assert snapshot_acks, "no grant was booked from a snapshot's results"
        assert problems == []
    finally:
        for host in hosts.values():
            host.proc.stop()
        coord.stop()
