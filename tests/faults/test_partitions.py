"""Grants end on time on the host whether the agent is connected or cut off (P1), and a cut-off
agent follows each grant's offline policy (P6): `revoke_after` ends after the grace, `hold` keeps
until not_after; a partition shorter than the grace ends nothing."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta

import pytest

from jitmesh import Grant, GrantState

from .harness import (
    GRACE,
    HOLD,
    MARGIN_MS,
    OFFLINE,
    Cluster,
    audit_settled,
    record_pairs,
    wait_in_force,
    wait_removed,
)
from .results import Recorder

pytestmark = pytest.mark.subprocess

# A dead connection is noticed after keepalive + ping timeout (2 s + 1 s), plus a ping's jitter.
DETECT = 4.0


async def test_connected_grants_end_on_time(
    cluster: Cluster, recorder: Recorder, rng: random.Random, long_run: bool
) -> None:
    alice = await cluster.client("alice")
    oracle = cluster.agents["web-1"].oracle
    count = 40 if long_run else 10
    grants: dict[tuple[str, str], Grant] = {}
    for action in HOLD[:count]:
        grants[("alice", action)] = await cluster.grant(
            alice, "web-1", action, rng.uniform(1.0, 3.0)
        )
        await asyncio.sleep(rng.uniform(0, 0.1))  # spread the deadlines a little
    for pair in grants:
        await wait_removed(oracle, pair, 30)
    overstays = record_pairs(recorder, oracle, grants, phase="connected")
    assert max(overstays) <= MARGIN_MS, overstays
    await audit_settled(
        recorder,
        await cluster.client("admin"),
        {g.id: "agent.grant.expired" for g in grants.values()},
    )


async def test_partition_longer_than_the_grace(
    cluster: Cluster, recorder: Recorder, rng: random.Random, long_run: bool
) -> None:
    alice = await cluster.client("alice")
    web = cluster.agents["web-1"]
    offline_pair, held_pair = ("alice", OFFLINE[0]), ("alice", HOLD[0])
    offline = await cluster.grant(alice, "web-1", OFFLINE[0], 60)
    held = await cluster.grant(alice, "web-1", HOLD[0], 60)
    for grant in (offline, held):
        await cluster.wait_grant(alice, grant.id, {GrantState.ACTIVE})
    # Hold grants that expire while the agent is cut off.
    ending: dict[tuple[str, str], Grant] = {}
    for action in HOLD[1 : (21 if long_run else 9)]:
        ending[("alice", action)] = await cluster.grant(
            alice, "web-1", action, rng.uniform(5.0, 9.0)
        )
    for pair, grant in ending.items():
        await cluster.wait_grant(alice, grant.id, {GrantState.ACTIVE})
        await wait_in_force(web.oracle, pair)

    web.proxy.blackhole()  # silent: the TCP connection stays open, nothing gets through
    recorder.fault("partition_long")
    started = asyncio.get_running_loop().time()
    await wait_removed(web.oracle, offline_pair, DETECT + GRACE + 5)
    took = asyncio.get_running_loop().time() - started
    assert took <= DETECT + GRACE + MARGIN_MS / 1000, took
    assert took >= GRACE, took  # not before the grace
    for pair in ending:
        await wait_removed(web.oracle, pair, 15)
    assert held_pair in web.oracle.in_force()  # hold: kept while cut off
    overstays = record_pairs(recorder, web.oracle, ending, phase="partitioned")
    assert max(overstays) <= MARGIN_MS, overstays

    web.proxy.heal()
    await cluster.wait_connected("web-1")
    assert held_pair in web.oracle.in_force()
    expected = {g.id: "agent.grant.expired" for g in ending.values()}
    expected[offline.id] = "agent.grant.removed"
    await audit_settled(recorder, await cluster.client("admin"), expected)


async def test_partition_shorter_than_the_grace_and_one_way(
    cluster: Cluster, recorder: Recorder
) -> None:
    alice = await cluster.client("alice")
    web = cluster.agents["web-1"]
    pair = ("alice", OFFLINE[1])
    grant = await cluster.grant(alice, "web-1", OFFLINE[1], 60)
    await cluster.wait_grant(alice, grant.id, {GrantState.ACTIVE})
    await wait_in_force(web.oracle, pair)
    for up, down, kind in ((True, True, "partition_short"), (False, True, "partition_one_way")):
        web.proxy.blackhole(up=up, down=down)
        recorder.fault(kind)
        await asyncio.sleep(2.0)  # shorter than detection + grace: the fault itself
        web.proxy.heal()
        await cluster.wait_connected("web-1")
        assert pair in web.oracle.in_force()
    # Flapping and a reset: the agent reconnects; the grant stays.
    await web.proxy.flap(0.3, 3)
    recorder.fault("flapping")
    web.proxy.reset()
    recorder.fault("reset")
    await cluster.wait_connected("web-1")
    assert pair in web.oracle.in_force()
    # A refused coordinator for longer than the grace ends the revoke_after grant.
    web.proxy.refuse = True
    web.proxy.reset()
    recorder.fault("refuse")
    await wait_removed(web.oracle, pair, DETECT + GRACE + 5)
    web.proxy.heal()
    await cluster.wait_connected("web-1")
    assert pair not in web.oracle.in_force()
    assert web.oracle.history().double_applies(pair) == 0
    _ = timedelta
