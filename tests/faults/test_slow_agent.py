"""A stopped agent (nothing read from its stream) is cut off by the coordinator once its bounded
per-agent queue is full, instead of growing the coordinator's memory; when it reads again it
reconnects and resyncs from the command log, and every grant reaches it. Latency on the link
slows delivery but loses nothing.

Two forms: the agent process itself frozen with SIGSTOP in front of a coordinator subprocess (its
memory read from /proc), and the fault proxy stalling in front of an in-process coordinator (its
registry read directly)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest

from jitmesh import Client, Grant, GrantState
from server.app import build
from server.config import CoordinatorConfig

from .harness import (
    HOLD,
    MARGIN_MS,
    Cluster,
    audit_settled,
    record_pairs,
    rss_kib,
    wait_in_force,
    wait_removed,
)
from .oracle import Oracle
from .results import Recorder

pytestmark = pytest.mark.subprocess

QUEUE_LIMIT = 10
# How much the coordinator's resident memory may grow while the agent is stopped and grants keep
# coming for it. The coordinator grows by about 3.5 KiB per grant issued even with a healthy agent
# (11 MiB for 3,000 grants, measured): the few hundred grants of the quick form stay far below,
# the long form's thousands (until the queue cuts) below too. With an unbounded queue the long
# form's stream would never be cut, grants would keep coming, and the bound (checked after every
# batch) would be crossed after at most some 19,000 grants (before the queued commands' own memory).
RSS_BOUND_KIB = 64 * 1024
UNSETTLED = {GrantState.PENDING_DELIVERY, GrantState.REVOKING}


# The long form issues thousands of grants before the cut, and the agent resyncs them all.
@pytest.mark.timeout(900)
async def test_sigstopped_agent_is_cut_off_and_resyncs(
    tmp_path: Path, recorder: Recorder, long_run: bool
) -> None:
    """The agent process is frozen with SIGSTOP (by its pid) while grants and revokes keep coming
    for it. The coordinator (a subprocess, queue limit 10) cuts the stream and its resident memory
    stays bounded; after SIGCONT the agent reconnects, resyncs from the command log and ends with
    exactly the access the coordinator says it should have, each access applied once, and the
    audit complete.

    What cuts the stream: in the quick form, with the suite's keepalive (2 s, ping timeout 1 s),
    the first unanswered HTTP/2 ping, long before the queue of 10 fills: a frozen process's HTTP/2
    window and socket buffers take the commands of 1,200 to more than 6,000 grants before the
    coordinator's writer blocks. The long form sets the keepalive and ping timeout to 60 s, so
    that only the queue can cut, and checks it did (up to minutes of issuing and resyncing). A
    grant that expires while the agent is stopped is measured like a crash: the agent was not
    running, the allowance is the stopped time plus 250 ms."""
    cluster = Cluster(tmp_path, recorder)
    web = None
    try:
        # The cut itself is under test: pushback (which keeps accepted grants within half the
        # queue, server/domain/delivery.py) is raised out of the way so commands reach the queue.
        flags = ["--agent-queue-limit", str(QUEUE_LIMIT), "--agent-undelivered-limit", "1000000"]
        if long_run:
            flags += ["--keepalive", "60", "--keepalive-timeout", "60"]
        await cluster.start_coordinator(flags=flags)
        assert cluster.coordinator is not None
        coordinator_pid = cluster.coordinator.pid
        await cluster.apply_policy()
        web = await cluster.start_agent("web-1", direct=True)
        await cluster.wait_connected("web-1")
        alice = await cluster.client("alice")
        admin = await cluster.client("admin")
        kept_pair, revoked_pair, expiring_pair = (("alice", a) for a in HOLD[:3])
        await cluster.grant(alice, "web-1", HOLD[0], 1800)
        revoked = await cluster.grant(alice, "web-1", HOLD[1], 1800)
        expiring = await cluster.grant(alice, "web-1", HOLD[2], 3)
        for pair in (kept_pair, revoked_pair, expiring_pair):
            await wait_in_force(web.oracle, pair)
        before_kib = rss_kib(coordinator_pid)

        web.process.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        recorder.fault("agent_sigstop")
        await admin.revoke_grant(revoked.id, reason="faults")
        issued: list[Grant] = []
        async with asyncio.timeout(600 if long_run else 60):
            while await cluster.connected("web-1"):
                issued.extend(await grant_batch(cluster, alice, admin, len(issued), 20))
                grew_kib = rss_kib(coordinator_pid) - before_kib
                assert grew_kib < RSS_BOUND_KIB, (grew_kib, len(issued))
        recorder.fault("slow_agent_cut_off")
        # Commands keep coming for the stopped agent after the cut: they wait in the log.
        count = len(issued) + (200 if long_run else 40)
        while len(issued) < count:
            issued.extend(await grant_batch(cluster, alice, admin, len(issued), 10))
        grew_kib = rss_kib(coordinator_pid) - before_kib
        assert grew_kib < RSS_BOUND_KIB, (grew_kib, len(issued))
        cuts = await admin.list_audit(kind="agent.disconnected", agent="web-1")
        reasons = [e.details.get("reason", "") for e in cuts]
        assert reasons, "the coordinator recorded no cut"
        if long_run:
            assert any("queue full" in r for r in reasons), reasons

        # The short grant ends while the agent is stopped.
        async with asyncio.timeout(10):
            while time.time() < expiring.not_after.timestamp() + 0.5:
                await asyncio.sleep(0.05)
        web.process.signal(signal.SIGCONT)
        downtime = (time.monotonic() - stopped) * 1000
        await wait_removed(web.oracle, expiring_pair, 20)
        await cluster.wait_connected("web-1", timeout=60)

        # Everything settles, and the host holds exactly what the coordinator says.
        async with asyncio.timeout(600 if long_run else 60):
            while True:
                grants = await admin.list_grants(agent="web-1")
                if not any(g.state in UNSETTLED for g in grants):
                    break
                await asyncio.sleep(0.2)
        should = {(g.subject, g.action) for g in grants if g.state is GrantState.ACTIVE}
        assert kept_pair in should
        assert revoked_pair not in should
        await wait_for_access(web.oracle, should)
        history = web.oracle.history()
        doubles = sum(history.double_applies(p) for p in history.events)
        recorder.applies(double=doubles, unauthorized=0)
        assert doubles == 0
        over = record_pairs(
            recorder, web.oracle, {expiring_pair: expiring}, phase="stopped", downtime_ms=downtime
        )
        assert max(over) <= downtime + MARGIN_MS, (over, downtime)
        final = {g.id: g.state for g in grants}
        expected = {expiring.id: "agent.grant.expired", revoked.id: "grant.revoked"}
        for grant in issued:
            active = final[grant.id] is GrantState.ACTIVE
            expected[grant.id] = "grant.applied" if active else "grant.revoked"
        await audit_settled(recorder, admin, expected, timeout=120, agent="web-1")
    finally:
        if web is not None and web.process.running:
            web.process.signal(signal.SIGCONT)
        await cluster.close()


async def grant_batch(
    cluster: Cluster, alice: Client, admin: Client, start: int, count: int
) -> list[Grant]:
    """`count` grants at once, every other one revoked straight away. Grants 2k and 2k + 1 share
    their pair, so the revoked one mostly ends while the other holds the pair: the resync spends
    its time on commands, not on hook processes."""

    async def one(i: int) -> Grant:
        grant = await cluster.grant(alice, "web-1", HOLD[3 + (i // 2) % 50], 1800)
        if i % 2:
            await admin.revoke_grant(grant.id, reason="faults")
        return grant

    return list(await asyncio.gather(*(one(start + i) for i in range(count))))


async def wait_for_access(oracle: Oracle, should: set[tuple[str, str]]) -> None:
    async with asyncio.timeout(30):
        while oracle.in_force() != should or any(
            not oracle.history().in_force_at_end(p) for p in should
        ):
            await asyncio.sleep(0.05)


async def test_stopped_agent_is_cut_off_and_resyncs(tmp_path: Path, recorder: Recorder) -> None:
    from server.__main__ import _dev_setup

    config = CoordinatorConfig(
        data_dir=tmp_path / "coordinator",
        port=0,
        agent_queue_limit=10,
        # The cut itself is under test: pushback is raised out of the way (see above).
        agent_undelivered_limit=1_000_000,
        heartbeat=timedelta(seconds=1),
        keepalive=timedelta(seconds=2),
        keepalive_timeout=timedelta(seconds=1),
        default_policy="version: 1\nactions: [deploy]\nrules: []\n",
    )
    coordinator = await build(config)
    await _dev_setup(coordinator)
    runner = asyncio.create_task(coordinator.run())
    cluster = Cluster(tmp_path, recorder, port=coordinator.port)
    try:
        from tests.e2e.procs import read_env

        cluster.env = read_env(tmp_path / "coordinator" / "dev.env")
        await cluster.apply_policy()
        web = await cluster.start_agent("web-1")
        await cluster.wait_connected("web-1")
        alice = await cluster.client("alice")
        web.proxy.stall()
        recorder.fault("proxy_stall")
        sent = 0
        async with asyncio.timeout(120):
            while coordinator.registry.connected("web-1"):
                await grant_and_revoke(cluster, alice, sent)
                sent += 1
        recorder.fault("slow_agent_cut_off")
        web.proxy.heal()
        web.proxy.latency = 0.05
        recorder.fault("latency")
        await cluster.wait_connected("web-1", timeout=60)
        last = ("alice", HOLD[0])
        await cluster.grant(alice, "web-1", HOLD[0], 300)
        await wait_in_force(web.oracle, last, timeout=60)
        history = web.oracle.history()
        assert all(history.double_applies(p) == 0 for p in history.events)
        assert sent > 0
    finally:
        await cluster.close()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def grant_and_revoke(cluster: Cluster, alice: Client, i: int) -> None:
    """One grant, released at once. The loop runs until the coordinator cuts the stalled agent off,
    which under load can take more than 50 rounds, so pairs come round again: releasing each grant
    keeps any pair from being held by two grants at once (two live grants on one pair are two
    applies by design, which the oracle's per-pair count would take for a double apply)."""
    _, grant = await alice.create_request(
        agent="web-1", action=HOLD[1 + i % 50], duration=timedelta(minutes=5), reason="slow"
    )
    assert grant is not None
    cluster.recorder.issued()
    await alice.release_grant(grant.id)
