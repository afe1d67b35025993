"""The scenarios. Each runs the baseline and jitmesh interleaved (round after round) in the same
run, so both see the same machine at the same time."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import math
import os
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from jitmesh import Client
from jitmesh.types import Grant, GrantState, OfflinePolicy
from server.app import DB_NAME, build
from server.config import CoordinatorConfig
from server.domain.batching import Answer
from server.domain.expiry import Expirer
from server.domain.hub import Hub
from server.domain.models import ADMIN_GROUP, AgentAck, Command, Principal
from server.domain.policy import DEV_POLICY
from server.domain.receivers import DeliveryState
from server.store.base import SqlOutbox
from server.store.sqlite import SqliteOutbox, SqliteStore
from tests.support.swarm import Swarm, SwarmAgent, SwarmSettings, agent_name

from . import baseline as bl
from .delivery import delivery
from .procs import (
    Child,
    DevCoordinator,
    TlsCoordinator,
    bin_path,
    cpu_seconds,
    free_port,
    rss_bytes,
    spawn,
)
from .receiver import arrivals
from .stats import Scenario, median, percentile
from .swarmproc import SwarmProcesses, run_links
from .waiting import until

log = logging.getLogger("bench")
# Set by --profile: py-spy records the coordinator process during the throughput and fan-out runs.
PROFILE_DIR: Path | None = None
# Set by --native: py-spy also samples native frames (gRPC core, libsodium, SQLite). It stops the
# process for each sample to unwind its stack, so it is slower: 100 Hz instead of 200.
PROFILE_NATIVE = False
# Set by --perf: Linux perf records instead of py-spy (every thread, native only, without stopping
# the process): which thread and library the CPU goes to. Read with `perf report -i FILE`.
PROFILE_PERF = False
# Scenario numbers asked for with --only (empty: all); the fleet group skips the others' phases.
WANTED: set[str] = set()


def _wanted(number: str) -> bool:
    return not WANTED or number in WANTED


USERS = {"alice": ["developers"], "bob": ["sre"], "admin": [ADMIN_GROUP]}
JOIN = "jmj_bench-join-token"
HOOK_SECRET = "bench-webhook-secret"  # noqa: S105 - the bench's own receiver ignores it
HOUR = timedelta(hours=1)
MS = 1000.0
# Scenario 6's swarm processes (bench/swarmproc.py).
SWARM_PROCESSES = 4

RECONNECT_FLEET = (
    "real: jitmesh-coordinator dev process, SIGKILLed and restarted on its data directory; the "
    f"swarm's agents in {SWARM_PROCESSES} processes (bench/swarmproc.py: real Link + Engine per "
    "agent, one TCP connection each, the real agents' reconnect schedule)"
)
REAL_LOCAL = (
    "real: in-process coordinator (gRPC, SQLite, policy, audit), a real jitmesh-agent process "
    "(SQLite lease table, file enforcer), SDK over gRPC; baseline: raw grpc.aio stream to a "
    "separate process"
)
REAL_LOCAL_TLS = (
    "real: in-process coordinator serving TLS from its internal CA, a real jitmesh-agent process "
    "enrolled with a CSR and connected with its certificate (mTLS), SDK over TLS; baseline: raw "
    "grpc.aio stream over mTLS to a separate process"
)
REAL_FLEET_TLS = (
    "real: a coordinator process serving TLS from its internal CA (bench/tlscoord.py: "
    "server.app.build with tls=True, dev policy and users); the agents as in 3 (real Link + "
    f"Engine per agent, no expiry loop, one TCP connection each) but in {SWARM_PROCESSES} swarm "
    "processes (bench/swarmproc.py), each enrolled with a CSR and on mTLS with its own "
    "certificate; baseline: raw grpc.aio server and client processes over mTLS"
)
REAL_FLEET = (
    "real: jitmesh-coordinator dev process; swarm in the bench process: real Link + Engine per "
    "agent (no expiry loop), one TCP connection each, in-memory lease store and enforcer; "
    "baseline: raw grpc.aio server process, one stream per agent in another process"
)


# Scenarios 3 and 14: a lock on a subject sends every (wire 0.2) agent two commands, its REVOKE
# and a LOCK command the agent keeps (server/domain/locks.py); each round checks the count in the
# coordinator's log. The CPU row compares them with as many baseline messages per stream.
FANOUT_COMMANDS = 2
FANOUT_MESSAGES = (
    "jitmesh: two commands per agent at the lock (its REVOKE, then a LOCK command the 0.2 agent "
    "keeps), each written, signed, pushed and acked, plus an UNLOCK at the lift after the timed "
    "part (commands_per_agent_per_round counts them in the coordinator's log); baseline: one "
    "400-byte message per stream for the time row, two back to back for the CPU row"
)
FANOUT_CPU_NOTE = (
    "coordinator CPU from the lock call until every agent's REVOKE and LOCK are acked, per "
    "agent; baseline: server CPU for two messages per stream (pushed back to back, both acked)"
)


@dataclass(frozen=True)
class Sizes:
    rounds: int
    push_per_round: int
    approve_per_round: int
    agents: int
    fanout_rounds: int
    callers: int
    throughput_seconds: float
    expiry_grants: int
    # Scenario 12 (delivery): agent processes, SDK callers, seconds of flooding, grant seconds.
    flood: tuple[int, int, float, float] = (5, 50, 20.0, 20.0)
    # Scenario 16 (web page): concurrent clients, seconds per round, rounds.
    web: tuple[int, float, int] = (16, 10.0, 3)

    @staticmethod
    def quick() -> Sizes:
        return Sizes(5, 60, 20, 1000, 2, 32, 4.0, 10_000, (2, 24, 6.0, 5.0), (16, 2.0, 1))

    @staticmethod
    def full() -> Sizes:
        return Sizes(10, 500, 100, 10_000, 2, 64, 15.0, 100_000, (5, 50, 20.0, 20.0), (16, 10.0, 3))


def _say(text: str) -> None:
    print(f"bench: {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def _ms_list(values: Sequence[float]) -> list[float]:
    return [v * MS for v in values]


async def flood(tmp: Path, sizes: Sizes) -> list[Scenario]:
    """Scenario 12: delivery keeps up or pushes back (bench/delivery.py)."""
    agents, callers, seconds, grant = sizes.flood
    return [
        await delivery(
            tmp,
            agents=agents,
            callers=callers,
            seconds=seconds,
            grant=timedelta(seconds=grant),
            profiled=_profiled,
        )
    ]


# Scenarios 1, 2 and 8: one real agent process, the coordinator in this process.


class _Probe:
    """Times when the coordinator pushes a grant's command and when the agent's acks arrive."""

    def __init__(self) -> None:
        self.pushed: dict[str, float] = {}
        self.acked: dict[str, list[float]] = {}
        self._waiters: dict[tuple[str, int], asyncio.Future[None]] = {}

    def on_push(self, commands: Sequence[Command]) -> None:
        now = time.perf_counter()
        for command in commands:
            self.pushed.setdefault(command.grant_id, now)

    def on_ack(self, grant_id: str, at: float) -> None:
        times = self.acked.setdefault(grant_id, [])
        times.append(at)
        waiter = self._waiters.pop((grant_id, len(times)), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def acks(self, grant_id: str, count: int, within: float = 30.0) -> None:
        if len(self.acked.get(grant_id, [])) >= count:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[(grant_id, count)] = waiter
        async with asyncio.timeout(within):
            await waiter


async def local(tmp: Path, sizes: Sizes) -> list[Scenario]:
    """Scenarios 1, 2 and 8 in plain text, and 15 (2 with a webhook receiver) beside them."""
    return await _local(tmp, sizes, tls=False, webhook=_wanted("15"))


async def local_tls(tmp: Path, sizes: Sizes) -> list[Scenario]:
    """Scenario 13: scenario 1 over mTLS (and its baseline over mTLS)."""
    return await _local(tmp, sizes, tls=True, webhook=False)


async def _local(tmp: Path, sizes: Sizes, *, tls: bool, webhook: bool) -> list[Scenario]:
    real = REAL_LOCAL_TLS if tls else REAL_LOCAL
    push = Scenario(
        "13 push, mTLS" if tls else "1 push", f"{sizes.rounds}x{sizes.push_per_round} grants", real
    )
    approve = Scenario(
        "2 approve-to-enforced", f"{sizes.rounds}x{sizes.approve_per_round} approvals", real
    )
    notified = Scenario(
        "15 approve-to-enforced, webhook on",
        f"{sizes.rounds}x{sizes.approve_per_round} approvals, interleaved with 2",
        real + "; a webhook receiver process (stdlib HTTP server) takes every notice",
    )
    footprint = Scenario("8 agent footprint", "1 jitmesh-agent process", real)
    started = time.monotonic()
    config = CoordinatorConfig(
        data_dir=tmp / "coordinator",
        port=0,
        default_policy=DEV_POLICY,
        **({"tls": True, "agent_port": 0} if tls else {}),
    )
    coordinator = await build(config)
    admin = Principal("admin", frozenset({ADMIN_GROUP}))
    await coordinator.fleet.create_join_token(admin, {}, None, max_uses=None, token=JOIN)
    for user, groups in USERS.items():
        await coordinator.identity.ensure_user(user, groups, f"jmt_bench-{user}")
    probe = _Probe()
    registry_push = coordinator.registry.push
    fleet_ack_later = coordinator.fleet.ack_later

    def push_hook(commands: Sequence[Command]) -> None:
        probe.on_push(commands)
        registry_push(commands)

    def ack_hook(principal: Principal, acks: Sequence[AgentAck], answer: Answer) -> None:
        # Timed when the ack is read off the stream, as before its write.
        at = time.perf_counter()

        def done(failure: BaseException | None) -> None:
            for ack in acks:
                probe.on_ack(ack.grant_id, at)
            answer(failure)

        fleet_ack_later(principal, acks, done)

    # Instance attributes shadow the methods: the servicers call through them.
    setattr(coordinator.registry, "push", push_hook)  # noqa: B010
    setattr(coordinator.fleet, "ack_later", ack_hook)  # noqa: B010
    runner = asyncio.create_task(coordinator.run())
    address = f"127.0.0.1:{coordinator.port}"
    ca_file: Path | None = None
    base_tls: Path | None = None
    if tls:
        assert coordinator.ca is not None
        ca_file = coordinator.ca.directory / "ca.pem"
        (tmp / "baseline-tls").mkdir()
        base_tls = bl.tls_files(tmp / "baseline-tls")
    transport = ["--ca-file", str(ca_file)] if ca_file else ["--insecure"]
    children: list[Child] = []
    server = bl.BaselineServer()
    clients: list[Client] = []
    receiver: Child | None = None
    try:
        agents = (("bench-staging", "staging"),) if tls else (
            ("bench-staging", "staging"), ("bench-prod", "prod"),
        )  # fmt: skip
        for name, env in agents:
            access = tmp / f"{name}-access"
            access.mkdir()
            argv = [
                bin_path("jitmesh-agent"), "--coordinator", address, "--name", name,
                "--label", f"env={env}", "--join-token", JOIN, "--state", str(tmp / name),
                "--enforcer", f"file:{access}", "--log-level", "warning", *transport,
            ]  # fmt: skip
            children.append(spawn(argv, tmp / f"{name}.log"))
        for name, _ in agents:
            await until(lambda n=name: coordinator.registry.connected(n), 30, f"{name} connected")  # type: ignore[misc]
        port = await server.start(tls=base_tls)
        tls_flag = ["--tls", str(base_tls)] if base_tls else []
        base_child = spawn(
            [sys.executable, "-m", "bench.baseline", *tls_flag, "client", f"127.0.0.1:{port}"],
            tmp / "baseline-client.log",
        )
        children.append(base_child)
        await server.wait_streams(1, 30)
        for user in USERS:
            if ca_file:
                client = await Client.connect(address, token=f"jmt_bench-{user}", ca_file=ca_file)
            else:
                client = await Client.connect(address, token=f"jmt_bench-{user}", insecure=True)
            clients.append(client)
        alice, bob, admin_client = clients
        hook: _Webhook | None = None
        outbox = SqliteOutbox(coordinator.store) if webhook else None
        if webhook:
            hook = _Webhook(tmp / "webhook.log", free_port())
            receiver = spawn(
                [sys.executable, "-m", "bench.receiver", str(hook.port), str(hook.log)],
                tmp / "receiver.log",
            )
            await _accepting(hook.port, 30)

        base_rtt: list[float] = []
        push_lat: list[float] = []
        approve_lat: list[float] = []
        notified_lat: list[float] = []
        decided: dict[str, float] = {}
        round_p50: list[tuple[float, float, float]] = []
        notified_p50: list[float] = []
        # Warm-up: connections, caches, the first SQLite pages.
        for _ in range(20):
            await server.push()
        for _ in range(3):
            await _push_once(alice, probe)
        with _profiled(children[0].pid, "agent-tls" if tls else "agent", tmp):
            for _ in range(sizes.rounds):
                rtts = [await server.push() for _ in range(sizes.push_per_round)]
                pushes = [await _push_once(alice, probe) for _ in range(sizes.push_per_round)]
                base_rtt += rtts
                push_lat += pushes
                if tls:
                    round_p50.append((median(rtts), median(pushes), math.nan))
                    continue
                approvals = [
                    await _approve_once(alice, bob, probe) for _ in range(sizes.approve_per_round)
                ]
                approve_lat += approvals
                round_p50.append((median(rtts), median(pushes), median(approvals)))
                if hook is not None:
                    # The same approvals with a receiver configured: the outbox's notices are
                    # delivered by the sender while the next approvals run. Removed again
                    # before the next round's plain figures, once the outbox is drained: every
                    # notice of the round routed and none PENDING for the receiver (the
                    # grant.applied POSTs follow request.approved; one still in flight would
                    # load the next round's plain approvals, scenario 2, its comparison).
                    await admin_client.add_receiver(
                        "bench-hook", "webhook", target=hook.url, secret=HOOK_SECRET
                    )
                    with_hook = [
                        await _approve_once(alice, bob, probe, decided)
                        for _ in range(sizes.approve_per_round)
                    ]
                    notified_lat += with_hook
                    notified_p50.append(median(with_hook))
                    await hook.wait_approved(decided, 60)
                    await _wait_drained(outbox, 60)
                    await admin_client.remove_receiver("bench-hook")
        b, p, a = _ms_list(base_rtt), _ms_list(push_lat), _ms_list(approve_lat)
        ratios = [j / r for r, j, _ in round_p50]
        push.add("p50", percentile(p, 50), percentile(b, 50), target="<= 1.5x")
        push.add("p99", percentile(p, 99), percentile(b, 99), target="<= 1.6x")
        push.add("p99.9", percentile(p, 99.9), percentile(b, 99.9))
        push.extra["median_of_round_p50_ratios"] = median(ratios)
        push.extra["samples"] = len(p)
        if tls:
            push.extra["transport"] = (
                "jitmesh: agent on the mTLS agent port (certificate from the internal CA), SDK "
                "over server-side TLS; baseline: mTLS, ECDSA P-256 certificates from the same "
                "CA code"
            )
        else:
            approve.add("p50", percentile(a, 50), percentile(b, 50), target="<= 4x")
            approve.add("p99", percentile(a, 99), percentile(b, 99))
            approve.extra["median_of_round_p50_ratios"] = median([x / r for r, _, x in round_p50])
            approve.extra["measured_until"] = (
                "the agent's ack (sent after persist and apply) arrives"
            )
        if hook is not None:
            n = _ms_list(notified_lat)
            approve_plain = percentile(a, 50)
            notified.add(
                "p50", percentile(n, 50), approve_plain,
                note="baseline column: scenario 2's p50 (no receiver) from the same rounds",
            )  # fmt: skip
            notified.add("p99", percentile(n, 99), percentile(a, 99))
            delivered = hook.latencies(decided)
            notified.add(
                "webhook p50 (decision -> received)", percentile(_ms_list(delivered), 50),
                note="from just before the approve call until the receiver process read the "
                "request.approved notice's POST",
            )  # fmt: skip
            notified.add("webhook p99", percentile(_ms_list(delivered), 99))
            notified.extra["notices_received"] = len(arrivals(hook.log))
            notified.extra["notices_by_kind"] = dict(Counter(k for _, k, _ in arrivals(hook.log)))
            notified.extra["between_rounds"] = (
                "the receiver is removed only once the outbox is drained (all routed, none "
                "PENDING): no POST of a webhook round overlaps the next plain round"
            )
            notified.extra["round_p50_ms"] = _ms_list(notified_p50)
        footprint.add(
            "RSS",
            rss_bytes(children[0].pid) / 2**20,
            rss_bytes(base_child.pid) / 2**20,
            unit="MiB",
            target="<= 50 MiB",
            note="baseline: the raw grpc.aio client process",
        )
    finally:
        for client in clients:
            await client.close()
        for child in children:
            child.stop()
        if receiver is not None:
            receiver.stop()
        await server.stop()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    elapsed = time.monotonic() - started
    for s in (push, approve, notified, footprint):
        s.seconds = elapsed
    if tls:
        return [push]
    return [push, approve, footprint] + ([notified] if webhook else [])


@dataclass(frozen=True)
class _Webhook:
    log: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def latencies(self, decided: dict[str, float]) -> list[float]:
        """Seconds from each approval's decision until its request.approved notice arrived."""
        first: dict[str, float] = {}
        for at, kind, request_id in arrivals(self.log):
            if kind == "request.approved" and request_id in decided:
                first.setdefault(request_id, at)
        return [first[r] - decided[r] for r in decided if r in first]

    async def wait_approved(self, decided: dict[str, float], within: float) -> None:
        await until(
            lambda: len(self.latencies(decided)) >= len(decided), within, "notices received", 0.05
        )


async def _wait_drained(outbox: SqlOutbox | None, within: float) -> None:
    """Until every outbox entry is routed and no delivery is PENDING (each was sent and
    answered, or given up)."""
    assert outbox is not None

    async def drained() -> bool:
        _, unrouted = await outbox.unrouted(1)
        pending = await outbox.deliveries(
            receiver="", states=[DeliveryState.PENDING], limit=1, before=0
        )
        return not unrouted and not pending

    deadline = time.monotonic() + within
    while not await drained():
        if time.monotonic() > deadline:
            raise TimeoutError(f"notification outbox not drained after {within:.0f} s")
        await asyncio.sleep(0.02)


async def _accepting(port: int, within: float) -> None:
    async def ready() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        return True

    deadline = time.monotonic() + within
    while not await ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on port {port} after {within:.0f} s")
        await asyncio.sleep(0.05)


async def _push_once(alice: Client, probe: _Probe) -> float:
    _, grant = await alice.create_request(agent="bench-staging", action="deploy", duration=HOUR)
    assert grant is not None
    await probe.acks(grant.id, 1)
    latency = probe.acked[grant.id][0] - probe.pushed[grant.id]
    # Hand it back, so the next grant is applied by the enforcer again (not only ref-counted).
    await alice.release_grant(grant.id)
    await probe.acks(grant.id, 2)
    return latency


async def _approve_once(
    alice: Client, bob: Client, probe: _Probe, decided: dict[str, float] | None = None
) -> float:
    request, _ = await alice.create_request(
        agent="bench-prod", action="deploy", duration=HOUR, reason="bench"
    )
    if decided is not None:
        decided[request.id] = time.monotonic()
    started = time.perf_counter()
    _, grant = await bob.approve(request.id)
    assert grant is not None
    await probe.acks(grant.id, 1)
    latency = probe.acked[grant.id][0] - started
    await alice.release_grant(grant.id)
    await probe.acks(grant.id, 2)
    return latency


# Scenarios 3, 4 and 5: a real coordinator process and a swarm of agents in this process.


async def fleet(tmp: Path, sizes: Sizes) -> list[Scenario]:
    n = sizes.agents
    fanout = Scenario("3 fanout", f"{n} agents x {sizes.fanout_rounds} rounds", REAL_FLEET)
    capacity = Scenario("4 capacity", f"{n} agents", REAL_FLEET)
    throughput = Scenario(
        "5 throughput",
        f"{sizes.callers} callers x {sizes.throughput_seconds:.0f} s over {n} agents",
        REAL_FLEET,
    )
    scenarios = [capacity, throughput, fanout]
    started = time.monotonic()
    quiet = logging.NullHandler()  # the swarm's "link down" lines, not on the console
    link_log = logging.getLogger("agent.rpc.link")
    link_log.setLevel(logging.WARNING)
    link_log.addHandler(quiet)
    link_log.propagate = False
    (tmp / "fleet").mkdir()
    # No command-log retention: each lock round's commands are counted from the log afterwards
    # (`_LockRounds`), and a retention pass in between deleted acked revokes (a round of 10,000
    # counted 6,665, 2026-12-07 on a slow machine). Retention's cost is measured by
    # bench.retention; a pass is a few 1,000-agent batches a minute.
    coord = DevCoordinator(
        tmp / "fleet" / "coordinator", free_port(), extra=("--command-log-retention", "0")
    )
    base_port = free_port()
    base_child = spawn(
        [sys.executable, "-m", "bench.baseline", "serve", str(base_port)], tmp / "baseline.log"
    )
    base_target = f"127.0.0.1:{base_port}"
    tasks: list[asyncio.Task[None]] = []
    children: list[Child] = [base_child]
    clients: list[Client] = []
    try:
        await coord.start()
        await asyncio.sleep(1.0)
        coord_rss0 = rss_bytes(coord.pid)
        base_rss0 = rss_bytes(base_child.pid)
        swarm = Swarm(
            SwarmSettings(
                target=coord.address,
                join_token=coord.join_token,
                count=n,
                credentials_dir=tmp / "fleet" / "credentials",
                prefix="swarm",
                labels={"env": "staging"},
                heartbeat=30.0,
                keepalive_time=60.0,
                keepalive_timeout=20.0,
                welcome_timeout=60.0,
            )
        )
        tasks.append(asyncio.create_task(run_links(swarm)))
        _say(f"fleet: {n} swarm agents enrolling and connecting")
        connect_s = await swarm.wait_connected(n, within=max(120.0, n / 20))
        _say(f"fleet: {n} agents connected in {connect_s:.1f} s")
        capacity.extra["first_connect_and_enroll_s"] = connect_s
        # The baseline's agent ends live in their own process (one process would run out of
        # file descriptors with two sockets per agent).
        base_clients = spawn(
            [sys.executable, "-m", "bench.baseline", "clients", base_target, str(n)],
            tmp / "baseline-clients.log",
        )
        children.append(base_clients)
        base_connect_started = time.monotonic()
        await _wait_base_streams(base_target, n)
        capacity.extra["baseline_connect_s"] = time.monotonic() - base_connect_started
        await asyncio.sleep(2.0)

        # 4. capacity: RSS per connected agent, idle CPU over a few seconds.
        j_rss = (rss_bytes(coord.pid) - coord_rss0) / n
        b_rss = (rss_bytes(base_child.pid) - base_rss0) / n
        capacity.add("RSS per agent", j_rss / 1024, b_rss / 1024, unit="KiB", target="<= 64 KiB")
        total_j, total_b = rss_bytes(coord.pid) / 2**20, rss_bytes(base_child.pid) / 2**20
        capacity.add("coordinator RSS total", total_j, total_b, unit="MiB")
        j_idle, b_idle = await _idle_cpu([coord.pid, base_child.pid], 3.0)
        capacity.add("idle CPU", j_idle * 100, b_idle * 100, unit="% core")

        for user in ("alice", "admin"):
            for _ in range(4):
                # Thousands of calls are issued at once: each waits its turn at the writer.
                client = await Client.connect(
                    coord.address, token=coord.token(user), timeout=600, insecure=True
                )
                clients.append(client)
        alices, admins = clients[:4], clients[4:]
        names = [agent.name for agent in swarm.agents]

        _say("fleet: capacity measured; throughput")
        if _wanted("5"):
            # 5. throughput, baseline first.
            b_rate = await _echo_rate(base_target, sizes.callers, sizes.throughput_seconds)
            with _profiled(coord.pid, "throughput", tmp):
                j_rate, cpu_per, api_rate = await _throughput(
                    coord.pid, alices, swarm, names, sizes.callers, sizes.throughput_seconds
                )
            throughput.add(
                "requests/s (create -> agent applied)", j_rate, b_rate, unit="/s", target=">= 2000",
                note="baseline: raw unary calls/s, same concurrency",
            )  # fmt: skip
            throughput.add("requests/s accepted by the API", api_rate, b_rate, unit="/s")
            throughput.add("coordinator CPU per request", cpu_per * MS, unit="ms")

        if _wanted("3"):
            _say("fleet: fan-out rounds")
            # 3. fanout, interleaved rounds.
            await _fanout_rounds(
                fanout, coord, base_target, None, base_child, alices, admins,
                _SwarmEnforcers(swarm), names, sizes.fanout_rounds,
                lambda: _profiled(coord.pid, "fanout", tmp),
            )  # fmt: skip
            fanout.extra["issued_as"] = "one Locks.CreateLock call (subject alice, action restart)"
            fanout.extra["timed"] = (
                "jitmesh: the lock call until the last agent's enforcer removed the access; "
                "baseline: first push until the last ack is back at the server"
            )

    except Exception as exc:  # reported per scenario; what was measured stays
        log.exception("fleet scenarios failed")
        for scenario in scenarios:
            if not scenario.rows:
                scenario.error = f"{type(exc).__name__}: {exc}"
    finally:
        for client in clients:
            await client.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        coord.stop()
        for child in children:
            child.stop()
        link_log.removeHandler(quiet)
    elapsed = time.monotonic() - started
    for s in scenarios:
        s.seconds = elapsed
    return scenarios


async def reconnect(tmp: Path, sizes: Sizes) -> list[Scenario]:
    """Scenario 6: a fleet in `SWARM_PROCESSES` processes on the real agents' reconnect schedule
    (bench/swarmproc.py: one process cannot redial 10,000 links fast enough to measure the
    coordinator) enrolls and connects; the coordinator is SIGKILLed and restarted on its data
    directory once every link saw its stream break; timed from the kill until 50/90/99/100 % of
    the agents have a Welcome from the new process."""
    n = sizes.agents
    scenario = Scenario("6 reconnect", f"{n} agents", RECONNECT_FLEET)
    started = time.monotonic()
    (tmp / "reconnect").mkdir()
    coord = DevCoordinator(tmp / "reconnect" / "coordinator", free_port())
    try:
        await coord.start()
        await _reconnect(scenario, coord, tmp / "reconnect", n)
    except Exception as exc:  # reported per scenario; what was measured stays
        log.exception("reconnect scenario failed")
        if not scenario.rows:
            scenario.error = f"{type(exc).__name__}: {exc}"
    finally:
        coord.stop()
    scenario.seconds = time.monotonic() - started
    return [scenario]


async def _reconnect(reconnect: Scenario, coord: DevCoordinator, tmp: Path, n: int) -> None:
    _say(f"reconnect: {n} agents in {SWARM_PROCESSES} processes enrolling and connecting")
    parts = SwarmProcesses(tmp)
    try:
        await parts.start(coord.address, coord.join_token, tmp / "credentials", n, SWARM_PROCESSES)
        connect_s = await parts.until(
            lambda: sum(parts.connected) >= n, max(120.0, n / 20), f"{n} connected"
        )
        _say(f"reconnect: {n} agents connected in {connect_s:.1f} s; SIGKILL")
        reconnect.extra["swarm_processes"] = SWARM_PROCESSES
        reconnect.extra["first_connect_and_enroll_s"] = connect_s
        swarm_cpu0 = sum(cpu_seconds(pid) for pid in parts.pids)
        t_kill = time.monotonic()
        coord.kill()
        with contextlib.suppress(TimeoutError):
            await parts.until(lambda: sum(parts.connected) == 0, 10.0, "all disconnected")
        reconnect.extra["still_connected_at_restart"] = sum(parts.connected)
        noticed = time.monotonic() - t_kill
        restart_at = datetime.now(UTC)
        await parts.watch(restart_at)
        await coord.start()
        up = time.monotonic() - t_kill
        start_cpu = cpu_seconds(coord.pid)
        with contextlib.ExitStack() as profiles:
            # With --profile: the restarted coordinator and the first swarm process.
            profiles.enter_context(_profiled(coord.pid, "reconnect", tmp))
            profiles.enter_context(_profiled(parts.pids[0], "reconnect-swarm", tmp))
            with contextlib.suppress(TimeoutError):
                await parts.until(
                    lambda: len(parts.done) == SWARM_PROCESSES, max(120.0, n / 50), "all back"
                )
        # The restarted process's CPU since it started, and the swarm's since the kill: on a
        # machine where both share the cores, their sum against the elapsed time says whether
        # the machine bounded the figure.
        coord_cpu = cpu_seconds(coord.pid)
        swarm_cpu = sum(cpu_seconds(pid) for pid in parts.pids) - swarm_cpu0
        elapsed = time.monotonic() - t_kill
        marks = {pct: at - t_kill for pct, at in parts.marks(n, (50, 90, 99, 100)).items()}
        back = parts.agents_back()
        downs = sum(int(d["downs"]) for d in parts.done.values())  # type: ignore[call-overload]
        pushed_back = sum(int(d["pushed_back"]) for d in parts.done.values())  # type: ignore[call-overload]
    finally:
        await parts.stop()
    reconnect.add(
        "links noticed the kill",
        noticed * MS,
        unit="ms",
        note="from the SIGKILL until every link saw its stream break (at most 10 s: the "
        "coordinator is restarted then)",
    )
    reconnect.add(
        "coordinator serving again",
        up * MS,
        unit="ms",
        note="from the SIGKILL until the restarted process has written dev.env (listening, "
        "store open)",
    )
    reconnect.add(
        "coordinator start",
        (up - noticed) * MS,
        unit="ms",
        note="from the restart until the new process has written dev.env (listening, store open)",
    )
    for pct, at in marks.items():
        reconnect.add(f"{pct} % back", at * MS, unit="ms", target="<= 30 s" if pct == 100 else "")
    reconnect.add(
        "coordinator CPU, start until all back",
        coord_cpu,
        unit="s",
        note="user + system CPU of the restarted process from its start until the last agent "
        "was back (or the deadline)",
    )
    reconnect.add(
        "coordinator CPU, start",
        start_cpu,
        unit="s",
        note="user + system CPU of the restarted process until it served (written dev.env)",
    )
    reconnect.add(
        "coordinator CPU per returning agent",
        (coord_cpu - start_cpu) / max(1, back) * MS,
        unit="ms",
        note="the restarted process's CPU from serving until all were back, per agent back "
        "(handshakes, Hellos, Welcomes, resumes and refusals with a hint together)",
    )
    reconnect.add(
        "swarm CPU, kill until all back",
        swarm_cpu,
        unit="s",
        note=f"the {SWARM_PROCESSES} swarm processes' CPU over the same time; with the "
        f"coordinator's, against {os.cpu_count()} cores x the elapsed time, it shows whether "
        "this machine bounded the figure",
    )
    reconnect.extra["elapsed_s"] = elapsed
    reconnect.extra["cores"] = os.cpu_count()
    reconnect.add(
        "failed attempts",
        float(max(0, downs - pushed_back)),
        unit="",
        note="connection attempts after the restart began that ended without a stream other "
        "than by admission control: refused or reset while the coordinator was starting",
    )
    reconnect.add(
        "pushed back",
        float(pushed_back),
        unit="",
        note="attempts the restarted coordinator refused at once with a retry hint (admission "
        "control), each agent then waiting the hint, never less than its schedule",
    )
    reconnect.add("left behind", float(n - back), unit="agents", target="0")
    reconnect.extra["measured_from"] = "SIGKILL; restarted once the links saw it (<= 10 s)"
    reconnect.extra["schedule"] = "the real agents': base 1 s, cap 15 s, full jitter"


async def _fanout_rounds(
    fanout: Scenario,
    coord: Any,
    base_target: str,
    base_tls: Path | None,
    base_child: Any,
    alices: list[Client],
    admins: list[Client],
    enforced: _Enforcers,
    names: list[str],
    rounds: int,
    profiled: Callable[[], contextlib.AbstractContextManager[None]],
) -> None:
    """Scenarios 3 and 14: interleaved rounds of the baseline's fan-out and one lock's, and their
    rows (time until all revoked; CPU per agent like for like)."""
    n = len(names)
    j_times: list[float] = []
    b_times: list[float] = []
    j_cpu: list[float] = []
    b_cpu: list[float] = []
    locks = _LockRounds(coord.data / DB_NAME)
    for _ in range(rounds):
        elapsed, _ = await bl.fanout(base_target, base_tls)
        b_times.append(elapsed)
        # CPU like for like: as many messages per stream as a lock sends commands.
        cpu0 = cpu_seconds(base_child.pid)
        await bl.fanout(base_target, base_tls, messages=FANOUT_COMMANDS)
        b_cpu.append((cpu_seconds(base_child.pid) - cpu0) / n)
        elapsed, cpu = await _fanout_round(
            coord.pid, alices, admins, enforced, names, profiled(), locks
        )
        j_times.append(elapsed)
        j_cpu.append(cpu / n)
    fanout.add(
        f"all {n} revoked (median of rounds)", median(j_times) * MS, median(b_times) * MS,
        target="<= 1.2x",
    )  # fmt: skip
    fanout.add(
        "CPU per agent", median(j_cpu) * 1e6, median(b_cpu) * 1e6, unit="us",
        note=FANOUT_CPU_NOTE,
    )  # fmt: skip
    fanout.extra["rounds_ms"] = {"jitmesh": _ms_list(j_times), "baseline": _ms_list(b_times)}
    locks.report(fanout, n, j_cpu)
    fanout.extra["messages_per_stream"] = FANOUT_MESSAGES


async def fleet_tls(tmp: Path, sizes: Sizes) -> list[Scenario]:
    """Scenario 14: scenario 3 (one lock: a revoke and a LOCK command to every agent) with the
    coordinator serving TLS and every agent on mTLS, the agents in `SWARM_PROCESSES` swarm
    processes (one process did not enroll and connect 10,000 with CSRs in 500 s); the
    baseline's streams over mTLS too."""
    n = sizes.agents
    fanout = Scenario(
        "14 fanout, mTLS", f"{n} agents x {sizes.fanout_rounds} rounds", REAL_FLEET_TLS
    )
    started = time.monotonic()
    (tmp / "fleet").mkdir()
    coord = TlsCoordinator(tmp / "fleet" / "coordinator", free_port(), agent_port=free_port())
    (tmp / "baseline-tls").mkdir()
    base_tls = bl.tls_files(tmp / "baseline-tls")
    tls_flag = ["--tls", str(base_tls)]
    base_port = free_port()
    base_child = spawn(
        [sys.executable, "-m", "bench.baseline", *tls_flag, "serve", str(base_port)],
        tmp / "baseline.log",
    )
    base_target = f"127.0.0.1:{base_port}"
    children: list[Child] = [base_child]
    clients: list[Client] = []
    parts = SwarmProcesses(tmp / "fleet")
    try:
        await coord.start()
        _say(
            f"fleet-tls: {n} agents in {SWARM_PROCESSES} processes enrolling (CSR) and "
            "connecting (mTLS)"
        )
        await parts.start(
            coord.address, coord.join_token, tmp / "fleet" / "credentials", n, SWARM_PROCESSES,
            ca_file=coord.ca_file,
        )  # fmt: skip
        connect_s = await parts.until(
            lambda: sum(parts.connected) >= n, max(120.0, n / 20), f"{n} connected"
        )
        _say(f"fleet-tls: {n} agents connected in {connect_s:.1f} s")
        fanout.extra["first_connect_and_enroll_s"] = connect_s
        fanout.extra["swarm_processes"] = SWARM_PROCESSES
        children.append(
            spawn(
                [sys.executable, "-m", "bench.baseline", *tls_flag, "clients", base_target,
                 str(n)],
                tmp / "baseline-clients.log",
            )
        )  # fmt: skip
        await _wait_base_streams(base_target, n, base_tls)
        for user in ("alice", "admin"):
            for _ in range(4):
                clients.append(
                    await Client.connect(
                        coord.address, token=coord.token(user), timeout=600, ca_file=coord.ca_file
                    )
                )
        alices, admins = clients[:4], clients[4:]
        names = [agent_name("swarm", i) for i in range(n)]
        await _fanout_rounds(
            fanout, coord, base_target, base_tls, base_child, alices, admins,
            _ProcessEnforcers(parts, n), names, sizes.fanout_rounds,
            lambda: _profiled(coord.pid, "fanout-tls", tmp),
        )  # fmt: skip
    except Exception as exc:  # reported; what was measured stays
        log.exception("fleet-tls scenario failed")
        if not fanout.rows:
            fanout.error = f"{type(exc).__name__}: {exc}"
    finally:
        for client in clients:
            await client.close()
        await parts.stop()
        coord.stop()
        for child in children:
            child.stop()
    fanout.seconds = time.monotonic() - started
    return [fanout]


@contextlib.contextmanager
def _profiled(pid: int, name: str, tmp: Path) -> Iterator[None]:
    if PROFILE_DIR is None:
        yield
        return
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    if PROFILE_PERF:
        out = PROFILE_DIR / f"{name}.perf.data"
        argv = ["perf", "record", "-F", "499", "-g", "-p", str(pid)]
    else:
        out = PROFILE_DIR / f"{name}.txt"
        rate = "100" if PROFILE_NATIVE else "200"
        argv = [bin_path("py-spy"), "record", "-p", str(pid), "-r", rate, "--format", "raw"]
        if PROFILE_NATIVE:
            argv.append("--native")
    child = spawn([*argv, "-o", str(out)], tmp / f"profile-{name}.log")
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        child.proc.send_signal(2)
        child.proc.wait(30)


async def _wait_base_streams(target: str, n: int, tls: Path | None = None) -> None:
    for _ in range(600):
        _, count = await bl.fanout(target, tls)
        if count >= n:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"baseline: not {n} streams up")


async def _idle_cpu(pids: Sequence[int], seconds: float) -> list[float]:
    before = [cpu_seconds(pid) for pid in pids]
    await asyncio.sleep(seconds)
    return [(cpu_seconds(pid) - b) / seconds for pid, b in zip(pids, before, strict=True)]


async def _gather_limited(jobs: Sequence[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await job()

    return await asyncio.gather(*(one(job) for job in jobs))


async def _echo_rate(target: str, callers: int, seconds: float) -> float:
    import grpc

    count = 0
    async with grpc.aio.insecure_channel(target) as channel:
        echo = channel.unary_unary(bl.ECHO, None, None)
        stop = time.monotonic() + seconds

        async def caller() -> None:
            nonlocal count
            while time.monotonic() < stop:
                await echo(bytes(bl.PUSH_BYTES))
                count += 1

        started = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(callers)))
        return count / (time.monotonic() - started)


async def _throughput(
    pid: int,
    alices: Sequence[Client],
    swarm: Swarm,
    names: Sequence[str],
    callers: int,
    seconds: float,
) -> tuple[float, float, float]:
    """Returns (requests/s from create until applied on the agent, coordinator CPU s per
    request, requests/s the API accepted)."""
    by_name = {agent.name: agent for agent in swarm.agents}
    created: list[tuple[str, str]] = []
    own0 = time.process_time()
    picks = itertools.cycle(names)
    cpu0 = cpu_seconds(pid)
    started = time.monotonic()
    stop = started + seconds

    async def caller(client: Client) -> None:
        while time.monotonic() < stop:
            agent = next(picks)
            _, grant = await client.create_request(agent=agent, action="deploy", duration=HOUR)
            assert grant is not None
            created.append((agent, grant.id))

    await asyncio.gather(*(caller(alices[i % len(alices)]) for i in range(callers)))
    api_done = time.monotonic()

    async def all_applied() -> bool:
        for agent, grant_id in created:
            lease = await by_name[agent].store.lease(grant_id)
            if lease is None or lease.applied_at is None:
                return False
        return True

    limit = time.monotonic() + 120
    while not await all_applied():
        if time.monotonic() > limit:
            raise TimeoutError("throughput: grants not applied after 120 s")
        await asyncio.sleep(0.01)
    done = time.monotonic()
    cpu = cpu_seconds(pid) - cpu0
    print(
        f"bench: throughput: {len(created)} requests in {done - started:.1f} s; coordinator "
        f"CPU {cpu:.1f} s, bench process CPU {time.process_time() - own0:.1f} s",
        file=sys.stderr,
    )
    return len(created) / (done - started), cpu / len(created), len(created) / (api_done - started)


class _Enforcers(Protocol):
    """Where a fan-out round looks at the agents' enforcers: the swarm in this process (3) or
    in swarm processes (14). Times are `time.monotonic()`, one clock for every process of the
    machine."""

    @property
    def pids(self) -> Sequence[int]:
        """The processes running the agents (their CPU over the timed part is reported)."""

    async def granted(self, pair: tuple[str, str], within: float) -> None:
        """Until every agent has `pair` in force."""

    async def mark(self, pair: tuple[str, str]) -> None:
        """Removals of `pair` count from now on."""

    async def revoked(self, pair: tuple[str, str], within: float) -> float:
        """Until every agent removed `pair` after the mark; the latest removal's time."""


class _SwarmEnforcers:
    """The enforcers of a swarm in this process."""

    def __init__(self, swarm: Swarm) -> None:
        self._agents: Sequence[SwarmAgent] = swarm.agents
        self._marks: list[int] = []
        self.pids = [os.getpid()]

    async def granted(self, pair: tuple[str, str], within: float) -> None:
        agents = self._agents
        await until(lambda: all(pair in a.enforcer.in_force for a in agents), within, "granted")

    async def mark(self, pair: tuple[str, str]) -> None:
        self._marks = [len(a.enforcer.history) for a in self._agents]

    async def revoked(self, pair: tuple[str, str], within: float) -> float:
        agents = self._agents
        await until(lambda: not any(pair in a.enforcer.in_force for a in agents), within, "revoked")
        return max(
            (
                at
                for agent, mark in zip(agents, self._marks, strict=True)
                for at, op, what in agent.enforcer.history[mark:]
                if op == "remove" and what == pair
            ),
            default=-math.inf,
        )


class _ProcessEnforcers:
    """The enforcers of a fleet in swarm processes (bench/swarmproc.py, `follow`): each
    process reports its agents' counts and the enforcer's own stamp of its latest removal."""

    def __init__(self, parts: SwarmProcesses, agents: int) -> None:
        self._parts = parts
        self._agents = agents
        self._follows = itertools.count(1)
        self.pids = parts.pids

    async def granted(self, pair: tuple[str, str], within: float) -> None:
        await self._parts.follow(next(self._follows), pair)
        await self._parts.until(
            lambda: self._parts.followed()[0] >= self._agents, within, "granted"
        )

    async def mark(self, pair: tuple[str, str]) -> None:
        await self._parts.follow(next(self._follows), pair)

    async def revoked(self, pair: tuple[str, str], within: float) -> float:
        await self._parts.until(
            lambda: self._parts.followed()[1] >= self._agents, within, "revoked"
        )
        last = self._parts.followed()[2]
        return -math.inf if last is None else last


async def _fanout_round(
    pid: int,
    alices: Sequence[Client],
    admins: Sequence[Client],
    enforced: _Enforcers,
    names: Sequence[str],
    profiled: contextlib.AbstractContextManager[None],
    locks: _LockRounds | None = None,
) -> tuple[float, float]:
    """Grant (alice, restart) on every agent (not timed), then revoke them all at once: the
    seconds until the last agent removed it, and the coordinator CPU seconds spent. Only the
    timed part runs under `profiled`. With `locks` (a SQLite coordinator): the CPU is read once
    every LOCK command is acked too, and `locks` notes what the round sent."""
    pair = ("alice", "restart")
    grants: list[str] = []

    def creator(i: int) -> Callable[[], Awaitable[None]]:
        async def create() -> None:
            _, grant = await alices[i % len(alices)].create_request(
                agent=names[i], action="restart", duration=HOUR
            )
            assert grant is not None
            grants.append(grant.id)

        return create

    await _gather_limited([creator(i) for i in range(len(names))], 64)
    await enforced.granted(pair, 300)
    await asyncio.sleep(0.5)
    await enforced.mark(pair)
    with profiled:
        return await _revoke_all(pid, admins, enforced, pair, len(names), len(grants), locks)


async def _revoke_all(
    pid: int,
    admins: Sequence[Client],
    enforced: _Enforcers,
    pair: tuple[str, str],
    agents: int,
    expected: int,
    locks: _LockRounds | None,
) -> tuple[float, float]:
    db = locks.db if locks is not None else None
    before = _command_counts(db)
    before_acked = _command_counts(db, acked=True)
    cpu0 = cpu_seconds(pid)
    swarm_cpu0 = sum(cpu_seconds(p) for p in enforced.pids)
    started = time.monotonic()
    # One lock: one call; one transaction writes a revoke into every agent's log, then the
    # handout steps (1,000 agents each, before the call returns) a LOCK command the wire 0.2
    # agent (every swarm agent) keeps; each signed, pushed and acked.
    lock, revoked, _ = await admins[0].create_lock(
        subject="alice", action="restart", reason="bench fan-out"
    )
    returned = time.monotonic() - started
    if revoked != expected:
        raise RuntimeError(f"the lock revoked {revoked} grants, expected {expected}")
    last = await enforced.revoked(pair, 300)
    swarm_cpu = sum(cpu_seconds(p) for p in enforced.pids) - swarm_cpu0
    if locks is not None:
        locks.call_returned_s.append(returned)
        locks.revoked_seen_s.append(time.monotonic() - started)
        locks.swarm_cpu.append(swarm_cpu)
        # The revoke is first in each agent's log; the LOCK's ack can still be on its way: the
        # CPU is read once every one is in, so it covers both commands (FANOUT_COMMANDS).
        locks.cpu_at_revoked.append(cpu_seconds(pid) - cpu0)
        acked = before_acked["lock"] + agents
        await until(
            lambda: _command_counts(db, acked=True)["lock"] >= acked, 300, "LOCK acked", 0.05
        )
        locks.lock_acked_s.append(time.monotonic() - started)
    cpu = cpu_seconds(pid) - cpu0
    await admins[0].lift_lock(lock.id, reason="next round")
    if locks is not None:
        # The next round begins with the baseline's: it waits until every agent acked the
        # lift's UNLOCK. Before 2026-12-07 it did not, and each second baseline round at 10,000
        # ran beside that tail: 1.35-3.1x the first (five runs of 3 and 14).
        unlocked = before_acked["unlock"] + agents
        await until(
            lambda: _command_counts(db, acked=True)["unlock"] >= unlocked, 300, "UNLOCK acked", 0.05
        )
        sent = _command_counts(db) - before
        if (sent["revoke"], sent["lock"]) != (expected, agents):
            raise RuntimeError(f"a lock round sent {dict(sent)}, expected a revoke and a LOCK each")
        locks.sent.update(sent)
        locks.rounds += 1
    return max(last, started) - started, cpu


def _command_counts(db: Path | None, *, acked: bool = False) -> Counter[str]:
    """Rows of the coordinator's command log by kind (read-only, beside the running process;
    `acked`: only those acked); nothing without a SQLite database."""
    if db is None:
        return Counter()
    where = " WHERE acked_at IS NOT NULL" if acked else ""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute(f"SELECT kind, count(*) FROM commands{where} GROUP BY kind")  # noqa: S608
        return Counter({kind: count for kind, count in rows})


@dataclass
class _LockRounds:
    """What the lock rounds of 3 and 14 sent, read from the coordinator's database `db`."""

    db: Path
    sent: Counter[str] = field(default_factory=Counter)
    rounds: int = 0
    # Coordinator CPU seconds at the last revoke (the CPU row's end before 2026-12-06 22:20),
    # and seconds from the lock call until every LOCK command was acked.
    cpu_at_revoked: list[float] = field(default_factory=list)
    lock_acked_s: list[float] = field(default_factory=list)
    # Seconds from the lock call until it returned (after its LOCK handout steps), until this
    # process saw every revoke applied (not before the call returned, and later than the last
    # enforcer's own stamp, the timed figure: swarm processes report every 0.1 s), and the CPU
    # seconds of the process(es) running the swarm until then (the bench process itself for 3).
    call_returned_s: list[float] = field(default_factory=list)
    revoked_seen_s: list[float] = field(default_factory=list)
    swarm_cpu: list[float] = field(default_factory=list)

    def report(self, scenario: Scenario, agents: int, cpu_per_agent: Sequence[float]) -> None:
        scenario.extra["commands_per_agent_per_round"] = {
            kind: count / (agents * self.rounds) for kind, count in sorted(self.sent.items())
        }
        scenario.extra["cpu_per_agent_us"] = {
            "until_every_lock_acked (the row)": [c * 1e6 for c in cpu_per_agent],
            "until_the_last_revoke (before 22:20)": [c / agents * 1e6 for c in self.cpu_at_revoked],
        }
        scenario.extra["every_lock_acked_after_ms"] = _ms_list(self.lock_acked_s)
        scenario.extra["lock_call_returned_after_ms"] = _ms_list(self.call_returned_s)
        scenario.extra["every_revoke_seen_after_ms"] = _ms_list(self.revoked_seen_s)
        scenario.extra["swarm_cpu_s_until_every_revoke_seen"] = self.swarm_cpu


# Scenario 7: the coordinator's expiry sweep.


async def expiry(tmp: Path, sizes: Sizes) -> list[Scenario]:
    n = sizes.expiry_grants
    scenario = Scenario(
        "7 expiry sweep",
        f"{n} grants due at once",
        "real: SqliteStore + Expirer (one audit event per grant, hash chain); baseline: plain "
        "sqlite3, one UPDATE and one hashed INSERT per row, one transaction",
    )
    started = time.monotonic()
    store = await SqliteStore.open(tmp / "expiry" / "coordinator.db")
    try:
        created = datetime.now(UTC) - timedelta(hours=2)
        batch = 5000
        for first in range(0, n, batch):
            async with store.transaction() as tx:
                for i in range(first, min(n, first + batch)):
                    await tx.insert_grant(_due_grant(i, created))
        now = created + timedelta(hours=2)
        b = _baseline_sweep(n)
        sweep_started = time.perf_counter()
        grants, _ = await Expirer(store, Hub(), _FixedClock(now)).sweep(now)
        j = time.perf_counter() - sweep_started
        if grants != n:
            raise RuntimeError(f"expiry sweep expired {grants} of {n} grants")
        scenario.add(f"{n} grants", j * MS, b * MS, target="< 1 s (100,000)")
    finally:
        await store.close()
    scenario.seconds = time.monotonic() - started
    return [scenario]


def _due_grant(i: int, created: datetime) -> Grant:
    return Grant(
        id=f"grt_bench{i:08d}",
        request_id=f"req_bench{i:08d}",
        agent=f"agent-{i % 1000}",
        subject="alice",
        action="deploy",
        not_before=created,
        not_after=created + timedelta(hours=1),
        state=GrantState.ACTIVE,
        offline=OfflinePolicy(),
        created_at=created,
        grant_seq=i + 1,
        epoch=1,
    )


def _baseline_sweep(n: int) -> float:
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute("CREATE TABLE g (id TEXT PRIMARY KEY, state TEXT, not_after INTEGER)")
    db.execute("CREATE TABLE a (seq INTEGER PRIMARY KEY, grant_id TEXT, prev TEXT, hash TEXT)")
    db.executemany("INSERT INTO g VALUES (?, 'ACTIVE', 0)", ((f"g{i}",) for i in range(n)))
    started = time.perf_counter()
    db.execute("BEGIN")
    ids = [r[0] for r in db.execute("SELECT id FROM g WHERE state = 'ACTIVE' AND not_after <= 1")]
    db.executemany("UPDATE g SET state = 'EXPIRED' WHERE id = ?", ((i,) for i in ids))
    prev = ""
    rows = []
    for seq, grant_id in enumerate(ids, 1):
        digest = hashlib.sha256(f"{prev}|{seq}|{grant_id}|grant.expired".encode()).hexdigest()
        rows.append((seq, grant_id, prev, digest))
        prev = digest
    db.executemany("INSERT INTO a VALUES (?, ?, ?, ?)", rows)
    db.execute("COMMIT")
    elapsed = time.perf_counter() - started
    db.close()
    return elapsed


class _FixedClock:
    def __init__(self, at: datetime) -> None:
        self._at = at

    def now(self) -> datetime:
        return self._at

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
