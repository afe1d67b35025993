"""Many agents in one process: one Engine, Link and in-memory lease store per agent, one gRPC
connection each. For reconnect storms (tests/faults) and benchmarks (bench/): test support, never
shipped (it lives outside the packages pyproject installs).

    swarm = Swarm(SwarmSettings(target="127.0.0.1:7443", join_token=..., count=1000,
                                credentials_dir=tmp))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(swarm.run())
        await swarm.wait_connected(1000, within=60)

Each agent enrolls once with the (reusable) join token and keeps its credential in
`credentials_dir/<name>`; enforcement is a `MemoryEnforcer` per agent, so what each agent has in
force can be inspected (and its apply/remove history too).
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.enforcers.base import EnforcerSet
from agent.engine import Engine
from agent.identity import IdentityFile
from agent.rpc.link import Link, LinkSettings
from agent.store.credential import CredentialFile
from agent.store.keys import PinnedKeys
from agent.store.memory import MemoryLeaseStore
from jitmesh import __version__
from jitmesh.clock import Clock, SystemClock

from .enforcers import MemoryEnforcer


class _OwnConnectionLink(Link):
    """A Link whose channel never shares a connection with another Link of this process (gRPC
    pools subchannels per target by default, which would put the whole swarm on one socket)."""

    def _options(self) -> list[tuple[str, int]]:
        return [*super()._options(), ("grpc.use_local_subchannel_pool", 1)]


def _write_plainly(path: Path, text: str) -> None:
    """Write a swarm agent's file 0600 without fsync. A real agent makes its credential and
    pinned keys durable (`CredentialFile`: the file and its directory fsynced), each on its own
    host's disk; the swarm's one event loop doing that for every agent in turn made the
    machine's fsync latency (4-15 ms here) the pace of a whole swarm's enrollment: 4 fsyncs per
    agent, 65 % + 35 % of the swarm's samples while enrolling, the coordinator idle
    (docs/performance.md, "Cold connect"). A swarm's files need not survive a power cut."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text + "\n")


class _PlainFile(CredentialFile):
    """A file of the swarm's, written by `_write_plainly`."""

    def write(self, secret: str) -> None:
        _write_plainly(self.path, secret)


class _RememberedCredential(_PlainFile):
    """The credential file, read once: a Link reads it at every attempt, and thousands of
    links in one process dialling again after a restart made those reads about 8 % of the
    swarm's samples (docs/performance.md). Only this Link writes it, so memory stays true;
    written without fsync (`_write_plainly`)."""

    _unread = object()

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._known: object = self._unread

    def read(self) -> str | None:
        if self._known is self._unread:
            self._known = super().read()
        return self._known  # type: ignore[return-value]

    def write(self, secret: str) -> None:
        super().write(secret)
        self._known = secret

    def delete(self) -> None:
        super().delete()
        self._known = None


class _RememberedKeys(PinnedKeys):
    """The pinned command-signing keys, read once and written without fsync (as
    `_RememberedCredential`)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._known: dict[str, bytes] | None = None
        self._file = _PlainFile(path)

    def read(self) -> dict[str, bytes]:
        if self._known is None:
            self._known = super().read()
        return dict(self._known)

    def write(self, keys: dict[str, bytes]) -> None:
        super().write(keys)
        self._known = dict(keys)

    def delete(self) -> None:
        super().delete()
        self._known = None


@dataclass(frozen=True, slots=True)
class SwarmSettings:
    target: str
    join_token: str = field(repr=False)
    count: int
    credentials_dir: Path
    prefix: str = "swarm"
    # The agents are `{prefix}-{index:05d}` for index in [first, first + count): swarms in
    # several processes share one fleet's names and credentials directory.
    first: int = 0
    labels: Mapping[str, str] = field(default_factory=lambda: {"env": "staging"})
    backoff_base: float = 0.2
    backoff_cap: float = 5.0
    backoff_reset_after: float = 30.0
    heartbeat: float = 10.0
    keepalive_time: float = 30.0
    keepalive_timeout: float = 10.0
    welcome_timeout: float = 30.0
    # The coordinator's CA: each agent enrolls with a CSR and connects with its certificate
    # (mTLS, the identity in `credentials_dir/<name>.tls.json`); None: plain text and bearer
    # credentials.
    ca_pem: bytes | None = field(default=None, repr=False)


@dataclass
class SwarmAgent:
    name: str
    store: MemoryLeaseStore
    enforcer: MemoryEnforcer
    engine: Engine
    link: Link


class Swarm:
    def __init__(
        self,
        settings: SwarmSettings,
        *,
        clock: Clock | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self._clock = clock or SystemClock()
        settings.credentials_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.agents: list[SwarmAgent] = [
            self._build(i, rand) for i in range(settings.first, settings.first + settings.count)
        ]

    def _build(self, index: int, rand: Callable[[], float]) -> SwarmAgent:
        s = self.settings
        name = agent_name(s.prefix, index)
        store = MemoryLeaseStore()
        enforcer = MemoryEnforcer()
        engine = Engine(
            name=name, store=store, enforcers=EnforcerSet([enforcer]), clock=self._clock, rand=rand
        )
        link = _OwnConnectionLink(
            LinkSettings(
                target=s.target,
                name=name,
                labels=dict(s.labels),
                join_token=s.join_token,
                version=__version__,
                boot_id=f"swarm-{name}",
                backoff_base=s.backoff_base,
                backoff_cap=s.backoff_cap,
                backoff_reset_after=s.backoff_reset_after,
                heartbeat=s.heartbeat,
                keepalive_time=s.keepalive_time,
                keepalive_timeout=s.keepalive_timeout,
                welcome_timeout=s.welcome_timeout,
                ca_pem=s.ca_pem,
            ),
            engine=engine,
            credentials=_RememberedCredential(s.credentials_dir / name),
            # Command-signing keys pinned at enrollment, one file per agent.
            keys=_RememberedKeys(s.credentials_dir / f"{name}.keys"),
            identity=IdentityFile(s.credentials_dir / f"{name}.tls.json"),
            clock=self._clock,
            pacing=self._clock,
            rand=rand,
        )
        return SwarmAgent(name, store, enforcer, engine, link)

    def connected(self) -> int:
        return sum(agent.engine.connected for agent in self.agents)

    def disconnected_names(self) -> list[str]:
        return [agent.name for agent in self.agents if not agent.engine.connected]

    async def run(self, *, expiry_loops: bool = True) -> None:
        """Start every engine, then run all engines and links until cancelled. Without
        `expiry_loops` the engines' expiry loops do not run (they wake every second per agent
        to notice wall-clock jumps: at 10,000 agents in one process a core's worth of wake-ups;
        benchmarks whose grants outlast the run leave them out)."""
        raise_fd_limit()
        for agent in self.agents:
            await agent.store.claim(agent.name, f"swarm-{agent.name}")
            await agent.engine.start()
        async with asyncio.TaskGroup() as tasks:
            for agent in self.agents:
                if expiry_loops:
                    tasks.create_task(agent.engine.run())
                tasks.create_task(agent.link.run())

    async def wait_connected(self, count: int, within: float) -> float:
        """Wait until `count` agents are connected; returns the seconds it took."""
        return await self._wait(lambda: self.connected() >= count, within, f"{count} connected")

    async def wait_disconnected(self, within: float) -> float:
        return await self._wait(lambda: self.connected() == 0, within, "all disconnected")

    @staticmethod
    async def _wait(done: Callable[[], bool], within: float, what: str) -> float:
        started = time.monotonic()
        while not done():
            if time.monotonic() - started > within:
                raise TimeoutError(f"swarm: not {what} after {within}s")
            await asyncio.sleep(0.02)
        return time.monotonic() - started


def agent_name(prefix: str, index: int) -> str:
    """The name of a swarm's agent number `index` (the same in every process of a fleet)."""
    return f"{prefix}-{index:05d}"


def raise_fd_limit() -> None:
    """One socket per agent: lift the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
