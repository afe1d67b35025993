"""A loopback cluster of real processes for the fault suite: the coordinator (dev mode) and
agents (exec enforcer = the oracle) as subprocesses, each agent reaching the coordinator through
its own fault proxy, with the test parameters of docs/promises.md."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import grpc

from jitmesh import Client, Grant, GrantState
from tests.e2e.procs import BIN, free_port, read_env, wait_for, wait_healthy

from .oracle import History, Oracle
from .proxy import FaultProxy
from .results import Recorder

# docs/promises.md, parameters, "in the fault suite" column.
COORDINATOR_FLAGS = [
    "--heartbeat", "1", "--keepalive", "2", "--keepalive-timeout", "1",
    "--agent-queue-limit", "100",
]  # fmt: skip
# The backoff cap stays under the offline grace: with a cap equal to the grace (5 s)
# and backoff that resets only after 30 s healthy, a few short faults in a row could keep an agent
# away longer than the grace, and `revoke_after` then rightly ends the grant; the short-partition
# scenario is about faults that stay under the grace.
AGENT_FLAGS = [
    "--keepalive", "2", "--keepalive-timeout", "1",
    "--backoff-base", "0.2", "--backoff-cap", "1.5",
    "--remove-retries", "4", "--remove-retry-base", "0.2",
    "--skew-tolerance", "2", "--heartbeat", "1", "--reconcile-every", "2",
]  # fmt: skip
GRACE = 5.0
MARGIN_MS = 250.0
HOLD = [f"h{i}" for i in range(60)]
OFFLINE = [f"r{i}" for i in range(20)]
POLICY = f"""\
version: 1
actions: [{", ".join(HOLD + OFFLINE)}]
request_ttl: 1h
rules:
  - name: hold
    subjects: {{groups: [developers]}}
    actions: [{", ".join(HOLD)}]
    agents: {{labels: {{env: staging}}}}
    max_duration: 1h
    approval: auto
  - name: offline
    subjects: {{groups: [developers]}}
    actions: [{", ".join(OFFLINE)}]
    agents: {{labels: {{env: staging}}}}
    max_duration: 1h
    approval: auto
    offline: {{mode: revoke_after, grace: {int(GRACE)}s}}
"""


# `python -m tests.support...` from the repository's root: the launchers that build a real
# coordinator or agent with a fault injected (they are test code, not installed).
ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, "-m"]


def _crash_option(argv: list[str], i: int) -> bool:
    """`argv[i]` is `--crash-at` or its value."""
    return argv[i] == "--crash-at" or (i > 0 and argv[i - 1] == "--crash-at")


class Process:
    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.argv, self.log, self.env = argv, log, env or {}
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                cwd=ROOT,
            )

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        assert self.popen is not None
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=20)

    async def exited(self, timeout: float = 20) -> int:
        assert self.popen is not None
        popen = self.popen
        await wait_for(lambda: popen.poll() is not None, timeout, "process exit")
        return popen.returncode

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


@dataclass
class AgentHandle:
    name: str
    state: Path
    oracle: Oracle
    proxy: FaultProxy
    process: Process
    clock_file: Path

    def set_clock_offset(self, seconds: float) -> None:
        tmp = self.clock_file.with_suffix(".tmp")
        tmp.write_text(f"{seconds}\n")
        os.replace(tmp, self.clock_file)


@dataclass
class Cluster:
    root: Path
    recorder: Recorder
    port: int = field(default_factory=free_port)
    coordinator: Process | None = None
    env: dict[str, str] = field(default_factory=dict)
    agents: dict[str, AgentHandle] = field(default_factory=dict)
    _clients: list[Client] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start_coordinator(
        self, crash_at: str = "", wait: bool = True, flags: Sequence[str] = ()
    ) -> None:
        """`flags` come after the suite's own and override them (argparse: the last wins)."""
        data = self.root / "coordinator"
        # With a crash point: the real coordinator, built by the test launcher with the hook.
        program = (
            [*LAUNCH, "tests.support.crashing_coordinator", "--crash-at", crash_at, "--"]
            if crash_at
            else [str(BIN / "jitmesh-coordinator")]
        )
        self.coordinator = Process(
            [*program, "dev", "--data", str(data),
             "--listen", self.address, "--log-level", "WARNING", *COORDINATOR_FLAGS, *flags],
            self.root / "coordinator.log",
        )  # fmt: skip
        self.coordinator.start()
        if wait:
            await self._healthy(self.coordinator)
            await wait_for(lambda: (data / "dev.env").exists(), 20, "dev.env")
            self.env = read_env(data / "dev.env")

    async def _healthy(self, process: Process, timeout: float = 30) -> None:
        """Wait until the coordinator serves; fail at once (with its log) if it exited."""
        deadline = time.monotonic() + timeout
        while True:
            if not process.running:
                tail = process.log.read_text()[-2000:]
                raise AssertionError(f"coordinator exited at start:\n{tail}")
            try:
                await wait_healthy(self.address, timeout=1.0)
                return
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise

    async def client(self, user: str) -> Client:
        client = await Client.connect(self.address, token=self.env[f"JITMESH_TOKEN_{user.upper()}"])
        self._clients.append(client)
        return client

    async def apply_policy(self) -> None:
        admin = await self.client("admin")
        await admin.apply_policy(POLICY)

    async def start_agent(
        self,
        name: str,
        *,
        new: bool = True,
        crash_at: str = "",
        hook_timeout: str = "1s",
        direct: bool = False,
    ) -> AgentHandle:
        """`direct`: the agent dials the coordinator itself (its proxy is started but unused), so
        no proxy buffers bytes on the way when the agent process is frozen."""
        if new:
            proxy = FaultProxy(self.port)
            await proxy.start()
            oracle = Oracle(self.root / f"{name}-oracle")
            hooks = oracle.hooks_yaml(hook_timeout)
            clock_file = self.root / f"{name}.clock"
            clock_file.write_text("0\n")
            state = self.root / name
            # The real agent, built by the test launcher with a wall clock the test can move.
            process = Process(
                [*LAUNCH, "tests.support.faulty_agent", "--clock-offset-file", str(clock_file),
                 "--", "--name", name,
                 "--coordinator", self.address if direct else proxy.address,
                 "--label", "env=staging", "--join-token", self.env["JITMESH_JOIN_TOKEN"],
                 "--state", str(state), "--enforcer", f"exec:{hooks}", "--log-level", "info",
                 *AGENT_FLAGS],
                self.root / f"{name}.log",
            )  # fmt: skip
            self.agents[name] = AgentHandle(name, state, oracle, proxy, process, clock_file)
        handle = self.agents[name]
        # A crash point for this start only (the launcher's options end at "--").
        argv = handle.process.argv
        end = argv.index("--")
        launcher = [a for i, a in enumerate(argv[:end]) if not _crash_option(argv, i)]
        handle.process.argv = [
            *launcher,
            *(["--crash-at", crash_at] if crash_at else []),
            *argv[end:],
        ]
        handle.process.start()
        return handle

    async def connected(self, name: str) -> bool:
        admin = await self.client("admin") if not self._clients else self._clients[0]
        agents = {a.name: a for a in await admin.list_agents()}
        return name in agents and agents[name].connected

    async def wait_connected(self, name: str, timeout: float = 30) -> None:
        admin = await self.client("admin")
        async with asyncio.timeout(timeout):
            while True:
                agents = {a.name: a for a in await admin.list_agents()}
                if name in agents and agents[name].connected:
                    return
                await asyncio.sleep(0.05)

    async def grant(self, alice: Client, agent: str, action: str, seconds: float) -> Grant:
        request, grant = await alice.create_request(
            agent=agent, action=action, duration=timedelta(seconds=seconds), reason="faults"
        )
        assert grant is not None, request
        self.recorder.issued()
        return grant

    async def wait_grant(
        self, client: Client, grant_id: str, states: set[GrantState], timeout: float = 30
    ) -> Grant:
        async with asyncio.timeout(timeout):
            while True:
                grant = await client.get_grant(grant_id)
                if grant.state in states:
                    return grant
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
        self._clients.clear()
        for handle in self.agents.values():
            handle.process.stop()
            await handle.proxy.close()
        if self.coordinator is not None:
            self.coordinator.stop()

    async def drop_clients(self) -> None:
        for client in self._clients:
            await client.close()
        self._clients.clear()


def rss_kib(pid: int) -> int:
    """The resident set of a live process, from /proc/PID/status (VmRSS, in KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def overstay_ms(history: History, pair: tuple[str, str], end: datetime) -> float:
    """How long after `end` the pair was really removed (negative: before). Infinite if the
    pair was never removed after its last apply."""
    applies = history.applies(pair)
    removes = [t for t in history.removes(pair) if not applies or t >= applies[0]]
    if not removes:
        return float("inf")
    end_ns = int(end.timestamp() * 1e9)
    return (removes[-1] - end_ns) / 1e6


async def wait_removed(oracle: Oracle, pair: tuple[str, str], timeout: float) -> None:
    # The marker goes first, the log line follows: wait for both.
    await wait_for(
        lambda: pair not in oracle.in_force() and not oracle.history().in_force_at_end(pair),
        timeout,
        f"{pair} removed",
    )


async def wait_in_force(oracle: Oracle, pair: tuple[str, str], timeout: float = 20) -> None:
    await wait_for(
        lambda: pair in oracle.in_force() and oracle.history().in_force_at_end(pair),
        timeout,
        f"{pair} in force",
    )


def record_pairs(
    recorder: Recorder,
    oracle: Oracle,
    grants: dict[tuple[str, str], Grant],
    *,
    phase: str,
    downtime_ms: float = 0.0,
    ends: dict[tuple[str, str], datetime] | None = None,
) -> list[float]:
    """Record one measurement per grant (its pair is unique in the test); returns overstays."""
    history = oracle.history()
    out = []
    for pair, grant in grants.items():
        end = (ends or {}).get(pair, grant.not_after)
        over = overstay_ms(history, pair, end)
        unauthorized = sum(1 for t in history.applies(pair) if t > end.timestamp() * 1e9)
        recorder.grant(
            phase=phase,
            overstay_ms=over,
            downtime_ms=downtime_ms,
            double_applies=history.double_applies(pair),
            unauthorized=unauthorized,
        )
        out.append(over)
    return out


async def audit_count(client: Client, grant_id: str, kind: str) -> int:
    events = await client.list_audit(grant_id=grant_id)
    return sum(1 for e in events if e.kind == kind)


async def audit_settled(
    recorder: Recorder,
    client: Client,
    expected: dict[str, str],
    timeout: float = 20,
    *,
    agent: str = "",
) -> None:
    """Each grant id in `expected` must end with exactly one audit event of its kind. With
    `agent`, one listing of that agent's events per look instead of one per grant (thousands of
    grants)."""
    deadline = time.monotonic() + timeout
    counts: dict[str, int] = {}
    while True:
        if agent:
            found = Counter((e.grant_id, e.kind) for e in await client.list_audit(agent=agent))
            counts = {g: found[(g, k)] for g, k in expected.items()}
        else:
            counts = {g: await audit_count(client, g, k) for g, k in expected.items()}
        if all(c >= 1 for c in counts.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    # The coordinator's own gap detection (per-agent event counters) must have found nothing.
    gaps = len(await client.list_audit(kind="agent.events_missing"))
    stored = sum(min(c, 1) for c in counts.values()) - gaps
    duplicated = sum(max(c - 1, 0) for c in counts.values())
    recorder.audit(expected=len(expected), stored=stored, duplicated=duplicated)
    assert stored == len(expected), counts
    assert duplicated == 0, counts
    assert gaps == 0, "the coordinator saw agent event counters jump"
