"""Several coordinator replicas on one PostgreSQL database, as real processes (`jitmesh-coordinator
dev --store postgresql://...`), with real agent processes spread over them: a grant decided on one
replica reaches an agent held by another, locks refuse at once everywhere, approvals racing on two
replicas are decided once, expiry is done once, and a replica SIGKILLed under load loses nothing
and applies nothing twice (its agents fail over to the next address)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest

from jitmesh import Client, GrantState, RequestState
from jitmesh.errors import ConflictError, JitmeshError, PermissionDeniedError
from server.shared import new_key
from tests.support import postgres

from . import procs

pytestmark = pytest.mark.subprocess
MIN = timedelta(minutes=1)


@dataclass
class Replica:
    name: str
    port: int
    proc: procs.Proc
    data: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Cluster:
    root: Path
    dsn: str
    key_file: Path
    replicas: list[Replica] = field(default_factory=list)
    agents: dict[str, procs.Proc] = field(default_factory=dict)
    clients: list[Client] = field(default_factory=list)

    async def start_replica(self, name: str) -> Replica:
        data = self.root / name
        port = procs.free_port()
        proc = procs.coordinator(
            data, port, "--store", self.dsn, "--replica", name,
            "--secret-key-file", str(self.key_file), "--heartbeat", "1",
        )  # fmt: skip
        proc.start()
        await procs.wait_healthy(f"127.0.0.1:{port}")
        await procs.wait_for(lambda: (data / "dev.env").exists(), 20, f"{name} dev.env")
        replica = Replica(name, port, proc, data)
        self.replicas.append(replica)
        return replica

    def env(self, replica: Replica) -> dict[str, str]:
        return procs.read_env(replica.data / "dev.env")

    async def client(self, replica: Replica, user: str) -> Client:
        token = self.env(replica)[f"JITMESH_TOKEN_{user.upper()}"]
        client = await Client.connect(replica.address, token=token, timeout=15.0)
        self.clients.append(client)
        return client

    def start_agent(self, name: str, env: str, *replicas: Replica) -> tuple[Path, Path]:
        state, access = self.root / name, self.root / f"{name}-access"
        access.mkdir(exist_ok=True)
        join = self.env(replicas[0])["JITMESH_JOIN_TOKEN"]
        target = ",".join(r.address for r in replicas)
        proc = procs.agent(target, name, f"env={env}", join, state, access, "--heartbeat", "1")
        proc.start()
        self.agents[name] = proc
        return state, access


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with postgres.fresh_schema() as dsn:
        key_file = tmp_path / "secret.key"
        key_file.write_text(new_key())
        found = Cluster(tmp_path, dsn, key_file)
        try:
            yield found
        finally:
            for client in found.clients:
                await client.close()
            for proc in [*found.agents.values(), *(r.proc for r in found.replicas)]:
                proc.stop()


async def connected_to(client: Client, agent: str, replica: str) -> bool:
    listed = {a.name: a for a in await client.list_agents()}
    return agent in listed and listed[agent].connected and listed[agent].replica == replica


async def wait(predicate: object, timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while True:
            result = predicate()  # type: ignore[operator]
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(what)


async def test_a_grant_approved_on_one_replica_is_applied_by_an_agent_on_another(
    cluster: Cluster,
) -> None:
    a = await cluster.start_replica("ra")
    b = await cluster.start_replica("rb")
    _, access = cluster.start_agent("db-1", "prod", b)
    admin_a = await cluster.client(a, "admin")
    await wait(lambda: connected_to(admin_a, "db-1", "rb"), 20, "db-1 held by rb, seen from ra")

    alice = await cluster.client(a, "alice")
    bob = await cluster.client(a, "bob")
    request, grant = await alice.create_request(
        agent="db-1", action="deploy", duration=15 * MIN, reason="INC-1"
    )
    assert grant is None
    assert request.state is RequestState.PENDING
    _, grant = await bob.approve(request.id)
    assert grant is not None
    # Committed on ra; the NOTIFY wakes rb, which holds db-1's stream.
    await wait((access / "alice:deploy").exists, 10, "the grant on db-1's host")
    await wait(
        lambda: _state_is(admin_a, grant.id, GrantState.ACTIVE), 10, "the grant ACTIVE on ra"
    )
    assert (await admin_a.verify_audit()).ok


async def test_status_lists_the_running_replicas_and_whose_agents_they_hold(
    cluster: Cluster,
) -> None:
    a = await cluster.start_replica("ra")
    b = await cluster.start_replica("rb")
    cluster.start_agent("db-1", "prod", b)
    cluster.start_agent("db-2", "prod", b)
    admin = await cluster.client(a, "admin")
    await wait(lambda: connected_to(admin, "db-2", "rb"), 20, "db-2 held by rb")
    await wait(lambda: connected_to(admin, "db-1", "rb"), 20, "db-1 held by rb")
    status = await admin.status()
    assert status.replica == "ra"
    assert [(r.id, r.address, r.agents_connected) for r in status.replicas] == [
        ("ra", a.address, 0),
        ("rb", b.address, 2),
    ]
    # The mesh's count, not only the answering replica's streams.
    assert (status.agents_enrolled, status.agents_connected) == (2, 2)
    env = {"JITMESH_COORDINATOR": a.address, "JITMESH_TOKEN": cluster.env(a)["JITMESH_TOKEN_ADMIN"]}
    code, out, err = await procs.jitctl("status", env=env)
    assert code == 0, err
    assert "2 running: ra (this, 0 agents), rb (2 agents)" in out
    # Stopped on purpose, rb is off the list at once (a killed one goes after 30 s silent).
    b.proc.stop()
    status = await admin.status()
    assert [r.id for r in status.replicas] == ["ra"]
    assert status.agents_connected == 0


async def _state_is(client: Client, grant_id: str, state: GrantState) -> bool:
    return (await client.get_grant(grant_id)).state is state


async def test_a_lock_created_on_one_replica_refuses_requests_on_another_at_once(
    cluster: Cluster,
) -> None:
    a = await cluster.start_replica("ra")
    b = await cluster.start_replica("rb")
    _, access = cluster.start_agent("web-1", "staging", a)
    admin_a = await cluster.client(a, "admin")
    alice_b = await cluster.client(b, "alice")
    await wait(lambda: connected_to(admin_a, "web-1", "ra"), 20, "web-1 held by ra")
    _, grant = await alice_b.create_request(agent="web-1", action="deploy", duration=15 * MIN)
    assert grant is not None
    await wait((access / "alice:deploy").exists, 10, "the grant made on rb applied via ra")

    await admin_a.create_lock(subject="alice", reason="INC-7")
    with pytest.raises(ConflictError, match="locked"):
        await alice_b.create_request(agent="web-1", action="logs", duration=MIN)
    await wait(lambda: not (access / "alice:deploy").exists(), 10, "the locked grant removed")


async def test_approve_and_deny_racing_on_two_replicas_are_decided_once(
    cluster: Cluster,
) -> None:
    a = await cluster.start_replica("ra")
    b = await cluster.start_replica("rb")
    cluster.start_agent("db-1", "prod", a)
    alice = await cluster.client(a, "alice")
    bob_a = await cluster.client(a, "bob")
    carol_b = await cluster.client(b, "carol")
    admin = await cluster.client(b, "admin")
    await wait(lambda: connected_to(admin, "db-1", "ra"), 20, "db-1 connected")
    outcomes: list[RequestState] = []
    for i in range(8):
        request, _ = await alice.create_request(
            agent="db-1", action="logs", duration=MIN, reason=f"race {i}"
        )
        assert request.state is RequestState.PENDING
        approve, deny = await asyncio.gather(
            bob_a.approve(request.id),
            carol_b.deny(request.id, reason="no"),
            return_exceptions=True,
        )
        final = await admin.get_request(request.id)
        grants = [g for g in await admin.list_grants(subject="alice") if g.request_id == request.id]
        if final.state is RequestState.DENIED:
            # Deny won; an approval that came first would have made a grant: it did not.
            assert grants == []
            assert not isinstance(deny, BaseException)
        else:
            assert final.state is RequestState.APPROVED
            assert isinstance(approve, tuple)
            assert isinstance(deny, JitmeshError)
            assert len(grants) == 1
            # Ended, so that the next round's request is not answered by reusing this grant.
            await alice.release_grant(grants[0].id)
        outcomes.append(final.state)
    assert (await admin.verify_audit()).ok


async def test_expiry_with_every_replica_running_is_done_once(cluster: Cluster) -> None:
    replicas = [await cluster.start_replica(f"r{i}") for i in range(3)]
    accesses = [cluster.start_agent(f"web-{i}", "staging", r)[1] for i, r in enumerate(replicas)]
    admin = await cluster.client(replicas[0], "admin")
    alice = [await cluster.client(r, "alice") for r in replicas]
    for i, replica in enumerate(replicas):
        await wait(lambda i=i, r=replica: connected_to(admin, f"web-{i}", r.name), 20, "agents")
    grants = []
    for i in range(3):
        for k, client in enumerate(alice):
            _, grant = await client.create_request(
                agent=f"web-{(i + k) % 3}", action="logs", duration=timedelta(seconds=2)
            )
            assert grant is not None
            grants.append(grant.id)

    async def all_ended() -> bool:
        states = {(await admin.get_grant(g)).state for g in grants}
        return states <= {GrantState.EXPIRED}

    await wait(all_ended, 30, "every grant expired")
    # No overstay: each host's access is gone with its grants.
    for access in accesses:
        await wait(lambda a=access: not (a / "alice:logs").exists(), 10, "access removed")
    # Each grant was moved to EXPIRED once: by one replica's sweep, or by its agent's own
    # expiry report when that came first; never by two sweeps.
    events = await admin.list_audit(kind="grant.expired", limit=1000)
    by_coordinator = [e.grant_id for e in events if e.actor == "coordinator"]
    assert len(by_coordinator) == len(set(by_coordinator))
    assert set(by_coordinator) <= set(grants)
    assert (await admin.verify_audit()).ok


async def test_a_replica_killed_under_load_loses_nothing_and_applies_nothing_twice(
    cluster: Cluster,
) -> None:
    a = await cluster.start_replica("ra")
    b = await cluster.start_replica("rb")
    accesses = {}
    for i in range(4):
        _, accesses[f"web-{i}"] = cluster.start_agent(f"web-{i}", "staging", a, b)
    admin = await cluster.client(b, "admin")
    alice = await cluster.client(b, "alice")
    for name in accesses:
        await wait(lambda n=name: connected_to(admin, n, "ra"), 20, f"{name} on ra")
    actions = ["deploy", "restart", "logs"]
    made: list[tuple[str, str, str]] = []

    async def load(rounds: int) -> None:
        for k in range(rounds):
            agent = f"web-{k % 4}"
            action = actions[(k // 4) % 3]
            with contextlib.suppress(JitmeshError):
                _, grant = await alice.create_request(agent=agent, action=action, duration=15 * MIN)
                assert grant is not None
                made.append((grant.id, agent, action))

    await load(6)
    cluster.replicas[0].proc.kill(signal.SIGKILL)
    await load(18)
    for name in accesses:
        await wait(lambda n=name: connected_to(admin, n, "rb"), 30, f"{name} failed over to rb")

    async def all_active() -> bool:
        states = [(await admin.get_grant(g)).state for g, _, _ in made]
        return all(state is GrantState.ACTIVE for state in states)

    await wait(all_active, 30, "every grant ACTIVE")
    for _, agent, action in made:
        assert (accesses[agent] / f"alice:{action}").exists()
    applied = await admin.list_audit(kind="grant.applied", limit=10_000)
    per_grant: dict[str, int] = {}
    for event in applied:
        per_grant[event.grant_id] = per_grant.get(event.grant_id, 0) + 1
    assert per_grant == {g: 1 for g, _, _ in made}
    assert (await admin.verify_audit()).ok
    # A client given both addresses carries on with the one still running.
    token = cluster.env(b)["JITMESH_TOKEN_ADMIN"]
    both = await Client.connect(f"{a.address},{b.address}", token=token, timeout=15.0)
    cluster.clients.append(both)
    assert {x.name for x in await both.list_agents()} == set(accesses)


async def test_a_policy_applied_on_one_replica_is_in_force_on_another_at_the_next_call(
    cluster: Cluster,
) -> None:
    a = await cluster.start_replica("ra")
    b = await cluster.start_replica("rb")
    cluster.start_agent("web-1", "staging", b)
    admin_a = await cluster.client(a, "admin")
    alice_b = await cluster.client(b, "alice")
    await wait(lambda: connected_to(admin_a, "web-1", "rb"), 20, "web-1 held by rb")
    _, grant = await alice_b.create_request(agent="web-1", action="deploy", duration=MIN)
    assert grant is not None  # the development policy: self-service on staging
    current = await admin_a.get_policy()
    stricter = current.yaml.replace(
        "actions: [deploy, restart, logs]\n    agents: {labels: {env: staging}}",
        "actions: [logs]\n    agents: {labels: {env: staging}}",
        1,
    )
    assert stricter != current.yaml
    await admin_a.apply_policy(stricter, expected_version=current.version)
    with pytest.raises(PermissionDeniedError):
        await alice_b.create_request(agent="web-1", action="deploy", duration=MIN)
    _, allowed = await alice_b.create_request(agent="web-1", action="logs", duration=MIN)
    assert allowed is not None


async def test_a_key_rotation_reaches_every_replica_and_their_agents(cluster: Cluster) -> None:
    a = await cluster.start_replica("ra")
    b = await cluster.start_replica("rb")
    state, access = cluster.start_agent("db-1", "prod", b)
    admin = await cluster.client(a, "admin")
    await wait(lambda: connected_to(admin, "db-1", "rb"), 20, "db-1 held by rb")
    rotate = await asyncio.create_subprocess_exec(
        str(procs.BIN / "jitmesh-coordinator"), "rotate-signing-key", "--data",
        str(cluster.root / "rotator"), "--store", cluster.dsn,
        "--secret-key-file", str(cluster.key_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await rotate.communicate()
    assert rotate.returncode == 0, err.decode()
    new_key = out.decode().split()[-1]
    # Each replica loads the new keys and reconnects its agents; the agent adopts the new key
    # from the Welcome (signed by the key it already trusts).
    pinned = state / "signing_keys.json"
    await wait(lambda: new_key in pinned.read_text(), 30, "the agent pinned the new key")
    alice = await cluster.client(a, "alice")
    bob = await cluster.client(a, "bob")
    request, _ = await alice.create_request(
        agent="db-1", action="deploy", duration=15 * MIN, reason="after rotation"
    )
    _, grant = await bob.approve(request.id)
    assert grant is not None
    # Signed by rb with the new key: the agent verifies and applies it.
    await wait((access / "alice:deploy").exists, 15, "a grant signed with the new key applied")


async def test_watchers_on_one_replica_see_changes_made_on_another(cluster: Cluster) -> None:
    a = await cluster.start_replica("ra")
    b = await cluster.start_replica("rb")
    cluster.start_agent("db-1", "prod", a)
    alice_a = await cluster.client(a, "alice")
    bob_a = await cluster.client(a, "bob")
    alice_b = await cluster.client(b, "alice")
    admin_b = await cluster.client(b, "admin")
    await wait(lambda: connected_to(admin_b, "db-1", "ra"), 20, "db-1 connected")
    request, _ = await alice_a.create_request(
        agent="db-1", action="logs", duration=MIN, reason="watch me"
    )
    head = (await admin_b.verify_audit()).events_checked

    watching = asyncio.Event()
    tailing = asyncio.Event()

    async def decided_seen_on_b() -> RequestState:
        async for seen in alice_b.watch_requests([request.id]):
            if seen.state is RequestState.PENDING:
                watching.set()  # the first snapshot: the stream is open
            else:
                return seen.state
        raise AssertionError("the watch ended")

    async def tail_seen_on_b() -> str:
        async for event in admin_b.tail_audit(after_seq=head):
            if event.kind == "request.created" and event.agent == "db-1":
                tailing.set()  # an event written on rb itself: the stream is open
            if event.kind == "request.approved":
                return event.request_id
        raise AssertionError("the tail ended")

    watcher = asyncio.create_task(decided_seen_on_b())
    tail = asyncio.create_task(tail_seen_on_b())
    async with asyncio.timeout(10):
        await watching.wait()
        await alice_b.create_request(agent="db-1", action="restart", duration=MIN, reason="x")
        await tailing.wait()
    # Both streams on rb wait; the approval is committed on ra.
    await bob_a.approve(request.id)
    async with asyncio.timeout(10):
        assert await watcher is RequestState.APPROVED
        assert await tail == request.id
