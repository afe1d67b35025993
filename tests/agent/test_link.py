"""The real agent app against a scripted coordinator (real gRPC on 127.0.0.1, same event loop)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from agent import app
from agent.config import AgentConfig, FileEnforcerConfig
from agent.domain.errors import EnrollmentError, EnrollmentRefused
from jitmesh.clock import FakeClock, SystemClock
from jitmesh.v1 import agentlink_pb2

from .coordinator import (
    Coordinator,
    CoordinatorMessage,
    grant_body,
    grant_message,
    revoke_body,
    serving,
    snapshot_body,
)
from .factories import T0, gid

APPLIED = agentlink_pb2.ACK_STATUS_APPLIED
DUPLICATE = agentlink_pb2.ACK_STATUS_DUPLICATE
FAILED = agentlink_pb2.ACK_STATUS_FAILED
REJECTED = agentlink_pb2.ACK_STATUS_REJECTED
MIN = timedelta(minutes=1)


class Host:
    """The agent's side: state directory, marker directory, fake lease clock."""

    def __init__(self, root: Path) -> None:
        self.state = root / "state"
        self.markers = root / "markers"
        self.clock = FakeClock(T0)

    def marker(self, subject: str = "alice", action: str = "deploy") -> Path:
        return self.markers / f"{subject}:{action}"

    def pairs(self) -> set[str]:
        """The markers in force (not the file enforcer's spares: dot files)."""
        if not self.markers.exists():
            return set()
        return {p.name for p in self.markers.iterdir() if not p.name.startswith(".")}

    def config(self, coordinator: Coordinator, /, **changes: Any) -> AgentConfig:
        values: dict[str, Any] = {
            "coordinator": coordinator.address,
            "name": "web-1",
            "labels": {"env": "test"},
            "join_token": "join-1",
            "state_dir": self.state,
            "enforcers": (FileEnforcerConfig(directory=self.markers),),
            "backoff_base": 0.05,
            "backoff_cap": 0.2,
        }
        values.update(changes)
        values.setdefault("insecure", "ca_file" not in values)
        return AgentConfig(**values)


@pytest.fixture
async def coordinator() -> AsyncIterator[Coordinator]:
    async with serving() as fake:
        yield fake


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


@contextlib.asynccontextmanager
async def running(host: Host, config: AgentConfig) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.ensure_future(
        app.run(config, clock=host.clock, pacing=SystemClock(), stop=stop, rand=lambda: 0.5)
    )
    try:
        yield task
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task


async def test_enrolls_saves_the_credential_privately_and_says_hello(
    coordinator: Coordinator, host: Host
) -> None:
    async with running(host, host.config(coordinator)):
        session = await coordinator.session()
        enrolled = coordinator.enrollments.get_nowait()
        assert (enrolled.join_token, enrolled.name) == ("join-1", "web-1")
        assert dict(enrolled.labels) == {"env": "test"}
        assert session.authorization == "Bearer cred-1"

        credential = host.state / "credential"
        assert credential.read_text().strip() == "cred-1"
        assert stat.S_IMODE(credential.stat().st_mode) == 0o600
        assert stat.S_IMODE(host.state.stat().st_mode) == 0o711

        hello = session.hello
        assert hello.agent == "web-1"
        assert dict(hello.labels) == {"env": "test"}
        assert (hello.last_applied_seq, hello.epoch) == (0, 0)
        assert list(hello.active_grant_ids) == []
        assert hello.boot_id
        assert hello.version
        assert hello.agent_time.ToDatetime() == T0.replace(tzinfo=None)


async def test_grant_is_applied_before_it_is_acked(coordinator: Coordinator, host: Host) -> None:
    async with running(host, host.config(coordinator)):
        session = await coordinator.session()
        grant_id = gid()
        ack = await session.command(grant_body(1, grant_id, T0, T0 + 10 * MIN))
        assert (ack.seq, ack.status, ack.grant_id) == (1, APPLIED, grant_id)
        # The marker exists when the ack arrives: applied first, acked after.
        marker = json.loads(host.marker().read_text())
        assert marker["subject"] == "alice"
        assert marker["action"] == "deploy"


async def test_the_log_names_the_replica_that_signed_each_command(
    coordinator: Coordinator, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator.welcome_extra = agentlink_pb2.Welcome(replica="ra")
    caplog.set_level(logging.INFO, logger="agent")
    async with running(host, host.config(coordinator)):
        session = await coordinator.session()
        first, second = gid(), gid()
        # Two replicas share one log: a command's seq is unique whoever signed it.
        body = grant_body(1, first, T0, T0 + 10 * MIN)
        body.replica = "ra"
        assert (await session.command(body)).status == APPLIED
        body = grant_body(2, second, T0, T0 + 10 * MIN, action="restart")
        body.replica = "rb-" + "x" * 100
        assert (await session.command(body)).status == APPLIED
    connected = [r for r in caplog.records if r.getMessage() == "connected"]
    assert [getattr(r, "replica", None) for r in connected] == ["ra"]
    handled = {
        getattr(r, "grant_id", ""): getattr(r, "replica", None)
        for r in caplog.records
        if r.getMessage() == "command handled"
    }
    # Signed, but only ever logged: cut to 64 characters.
    assert handled == {first: "ra", second: ("rb-" + "x" * 100)[:64]}


async def test_duplicate_command_is_reacked_without_a_second_apply(
    coordinator: Coordinator, host: Host
) -> None:
    async with running(host, host.config(coordinator)):
        session = await coordinator.session()
        body = grant_body(1, gid(), T0, T0 + 10 * MIN)
        assert (await session.command(body)).status == APPLIED
        inode = host.marker().stat().st_ino
        again = await session.command(body)
        assert (again.seq, again.status, again.reason) == (1, DUPLICATE, "")
        # A second apply would have renamed a new file over the marker.
        assert host.marker().stat().st_ino == inode


async def test_revoke_before_grant_refuses_the_late_grant(
    coordinator: Coordinator, host: Host
) -> None:
    async with running(host, host.config(coordinator)):
        session = await coordinator.session()
        grant_id = gid()
        assert (await session.command(revoke_body(1, grant_id))).status == APPLIED
        late = await session.command(grant_body(2, grant_id, T0, T0 + 10 * MIN))
        assert (late.status, late.reason, late.grant_id) == (REJECTED, "tombstoned", grant_id)
        assert host.pairs() == set()


async def test_overlapping_grants_keep_access_until_the_last_revoke(
    coordinator: Coordinator, host: Host
) -> None:
    async with running(host, host.config(coordinator)):
        session = await coordinator.session()
        first, second = gid(), gid()
        await session.command(grant_body(1, first, T0, T0 + 10 * MIN))
        await session.command(grant_body(2, second, T0, T0 + 20 * MIN))
        assert (await session.command(revoke_body(3, first))).status == APPLIED
        assert host.pairs() == {"alice:deploy"}
        assert (await session.command(revoke_body(4, second))).status == APPLIED
        assert host.pairs() == set()


async def test_commands_that_are_not_for_this_agent_or_do_not_parse_are_rejected(
    coordinator: Coordinator, host: Host
) -> None:
    async with running(host, host.config(coordinator)):
        session = await coordinator.session()
        other = await session.command(grant_body(1, gid(), T0, T0 + MIN, agent="web-2"))
        assert (other.status, other.reason) == (REJECTED, "not for this agent")
        session.send(CoordinatorMessage(command=agentlink_pb2.Command(seq=1, body=b"\xff\xff\xff")))
        garbage = await session.ack()
        assert (garbage.seq, garbage.status) == (1, REJECTED)
        bad = await session.command(grant_body(1, gid(), T0, T0 + MIN, subject="../../root"))
        assert bad.status == REJECTED
        assert "subject" in bad.reason
        # None of them moved the log: seq 1 is still new.
        ok = await session.command(grant_body(1, gid(), T0, T0 + MIN))
        assert (ok.status, ok.reason) == (APPLIED, "")
        assert host.pairs() == {"alice:deploy"}


async def test_expiry_removes_access_and_reports_it(coordinator: Coordinator, host: Host) -> None:
    async with running(host, host.config(coordinator)):
        session = await coordinator.session()
        grant_id = gid()
        await session.command(grant_body(1, grant_id, T0, T0 + MIN))
        assert host.pairs() == {"alice:deploy"}
        await host.clock.advance(MIN)
        event = await session.event()
        assert (event.kind, event.grant_id, event.subject, event.action) == (
            "grant.expired",
            grant_id,
            "alice",
            "deploy",
        )
        assert event.event_id
        assert event.observed_at.ToDatetime() == (T0 + MIN).replace(tzinfo=None)
        assert host.pairs() == set()


async def test_events_from_while_the_coordinator_was_down_arrive_after_reconnect(
    coordinator: Coordinator, host: Host
) -> None:
    async with running(host, host.config(coordinator)):
        session = await coordinator.session()
        grant_id = gid()
        await session.command(grant_body(1, grant_id, T0, T0 + MIN))
        coordinator.refuse = grpc.StatusCode.UNAVAILABLE
        session.end()
        await coordinator.refused.get()  # the agent is trying, and failing, to reconnect

        await host.clock.advance(MIN)  # expires while the coordinator is unreachable
        coordinator.refuse = None
        again = await coordinator.session()
        assert again.hello.last_applied_seq == 1
        assert list(again.hello.active_grant_ids) == []
        event = await again.event()
        assert (event.kind, event.grant_id) == ("grant.expired", grant_id)
        assert host.pairs() == set()


async def test_unacknowledged_events_are_sent_again_and_acknowledged_ones_are_not(
    coordinator: Coordinator, host: Host
) -> None:
    coordinator.ack_events = False
    config = host.config(coordinator)
    async with running(host, config):
        session = await coordinator.session()
        await session.command(grant_body(1, gid(), T0, T0 + MIN))
        await host.clock.advance(MIN)
        first = await session.event()
        coordinator.ack_events = True
        session.end()
        again = await coordinator.session()
        resent = await again.event()
        assert resent.event_id == first.event_id
        # The ack deleted it from the outbox: a later stream does not carry it.
        again.send(CoordinatorMessage(heartbeat=agentlink_pb2.Heartbeat()))
        again.end()
        third = await coordinator.session()
        await third.command(grant_body(2, gid(), T0 + MIN, T0 + 2 * MIN, action="ssh"))
        await host.clock.advance(MIN)
        nxt = await third.event()
        assert nxt.event_id != first.event_id
        assert nxt.action == "ssh"


async def test_reconnect_resumes_from_the_last_applied_sequence_number(
    coordinator: Coordinator, host: Host
) -> None:
    async with running(host, host.config(coordinator)):
        session = await coordinator.session()
        kept, gone = gid(), gid()
        await session.command(grant_body(1, kept, T0, T0 + 10 * MIN))
        await session.command(grant_body(2, gone, T0, T0 + 10 * MIN, action="ssh"))
        await session.command(revoke_body(3, gone))
        session.end(grpc.StatusCode.UNAVAILABLE)
        again = await coordinator.session()
        assert again.authorization == session.authorization  # no second enrollment
        assert again.hello.last_applied_seq == 3
        assert again.hello.epoch == 7
        assert list(again.hello.active_grant_ids) == [kept]
        duplicate = await again.command(revoke_body(3, gone))
        assert (duplicate.status, duplicate.reason) == (DUPLICATE, "")


async def test_restart_resumes_and_removes_what_expired_before_connecting(
    coordinator: Coordinator, host: Host
) -> None:
    config = host.config(coordinator)
    short, long = gid(), gid()
    async with running(host, config):
        session = await coordinator.session()
        await session.command(grant_body(1, short, T0, T0 + MIN))
        await session.command(grant_body(2, long, T0, T0 + 60 * MIN, action="ssh"))
    # Down: time passes and someone leaves access behind by hand.
    await host.clock.advance(5 * MIN)
    host.marker("mallory", "root").write_text("{}")

    async with running(host, config):
        session = await coordinator.session()
        # By the time the agent says hello, the host already matches the table.
        assert host.pairs() == {"alice:ssh"}
        assert session.hello.last_applied_seq == 2
        assert list(session.hello.active_grant_ids) == [long]
        events = sorted([(await session.event()).kind, (await session.event()).kind])
        assert events == ["drift.removed", "grant.expired"]
    assert coordinator.enrollments.qsize() == 1


async def test_snapshot_replaces_the_set(coordinator: Coordinator, host: Host) -> None:
    async with running(host, host.config(coordinator)):
        session = await coordinator.session()
        keep, drop, new = gid(), gid(), gid()
        await session.command(grant_body(4, keep, T0, T0 + 10 * MIN))
        await session.command(grant_body(5, drop, T0, T0 + 10 * MIN, action="ssh"))
        ack = await session.command(
            snapshot_body(
                3,
                [
                    grant_message(keep, T0, T0 + 10 * MIN),
                    grant_message(new, T0, T0 + 10 * MIN, subject="bob"),
                ],
            )
        )
        assert (ack.seq, ack.status) == (3, APPLIED)
        assert host.pairs() == {"alice:deploy", "bob:deploy"}
        session.end()
        again = await coordinator.session()
        assert again.hello.last_applied_seq == 3
        assert sorted(again.hello.active_grant_ids) == sorted([keep, new])


async def test_refused_credential_is_replaced_by_enrolling_again(
    coordinator: Coordinator, host: Host
) -> None:
    async with running(host, host.config(coordinator)):
        session = await coordinator.session()
        coordinator.credentials.clear()  # e.g. the coordinator forgot this agent
        coordinator.join_tokens = {"join-1"}
        session.end()
        assert await coordinator.refused.get() == "Bearer cred-1"
        again = await coordinator.session()
        assert again.authorization == "Bearer cred-2"
        assert (host.state / "credential").read_text().strip() == "cred-2"


@pytest.mark.parametrize(
    ("code", "why"),
    [
        # The coordinator refuses the Hello of an agent whose version it does not serve
        # (docs/wire.md, "Mixed versions"): the log says what to upgrade; it keeps retrying
        # (the coordinator may be downgraded, the agent upgraded).
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            "agent version 0.2.0 is not served by this coordinator (0.4.0): it serves its own"
            " minor version and the one before; upgrade the agent",
        ),
        # UNAVAILABLE is both a transport failure and the coordinator ending the stream (a slow
        # agent's queue full, a replaced stream): the record says which.
        (grpc.StatusCode.UNAVAILABLE, "outbound queue full (slow agent); it will resync"),
    ],
)
async def test_the_link_down_record_says_why_not_only_the_status_code(
    coordinator: Coordinator,
    host: Host,
    caplog: pytest.LogCaptureFixture,
    code: grpc.StatusCode,
    why: str,
) -> None:
    async with running(host, host.config(coordinator)):
        live = await coordinator.session()  # enrolled and connected once
        coordinator.refuse = code
        coordinator.refuse_details = why
        live.end()
        caplog.set_level("WARNING", logger="agent.rpc.link")
        await coordinator.refused.get()
        await coordinator.refused.get()  # a second attempt: the first one's "link down" is out
    reasons = [getattr(r, "reason", "") for r in caplog.records if r.getMessage() == "link down"]
    assert f"{code.name}: {why}" in reasons


async def test_without_credential_or_join_token_the_agent_refuses_to_start(
    coordinator: Coordinator, host: Host
) -> None:
    with pytest.raises(EnrollmentError, match="join token"):
        await app.run(host.config(coordinator, join_token=None), clock=host.clock)
    assert not (host.state / "agent.db").exists()


async def test_a_stream_without_welcome_is_given_up_and_retried(
    coordinator: Coordinator, host: Host
) -> None:
    coordinator.silent = True
    async with running(host, host.config(coordinator, welcome_timeout=0.2)):
        mute = await coordinator.session()
        async with asyncio.timeout(10):
            await mute.ended.wait()  # the agent hung up on its own
        coordinator.silent = False
        session = await coordinator.session()
        ack = await session.command(grant_body(1, gid(), T0, T0 + MIN))
        assert ack.status == APPLIED


async def test_heartbeats_follow_the_welcome_interval(coordinator: Coordinator, host: Host) -> None:
    coordinator.heartbeat_interval = Duration(nanos=50_000_000)
    async with running(host, host.config(coordinator)):
        session = await coordinator.session()
        async with asyncio.timeout(10):
            beat = await session.heartbeats.get()
        assert beat.sent_at.ToDatetime() == T0.replace(tzinfo=None)


async def test_stopping_closes_the_stream_and_keeps_the_table(
    coordinator: Coordinator, host: Host
) -> None:
    config = host.config(coordinator)
    grant_id = gid()
    async with running(host, config):
        session = await coordinator.session()
        await session.command(grant_body(1, grant_id, T0, T0 + 10 * MIN))
    async with asyncio.timeout(10):
        await session.ended.wait()
    # Stopped, not revoked: the lease is still in the table (and answers `check`).
    assert host.pairs() == {"alice:deploy"}
    async with running(host, config):
        again = await coordinator.session()
        assert list(again.hello.active_grant_ids) == [grant_id]


async def test_a_refused_enrollment_stops_the_agent_with_the_coordinators_reason(
    coordinator: Coordinator, host: Host
) -> None:
    """A used or wrong join token cannot become valid by asking again: the agent stops once,
    saying why, instead of retrying (and being audited) for ever."""
    coordinator.join_tokens = set()
    with pytest.raises(EnrollmentRefused, match=r"UNAUTHENTICATED\): join token is not valid"):
        async with asyncio.timeout(10):
            await app.run(host.config(coordinator), clock=host.clock, pacing=SystemClock())
    assert coordinator.enrollments.empty()
    assert coordinator.enroll_attempts == 1
    assert not (host.state / "credential").exists()


async def test_a_pushed_back_agent_waits_at_least_the_hint_then_connects(
    coordinator: Coordinator, host: Host
) -> None:
    # The schedule (base 0.05 s, cap 0.2 s) alone would dial again within 0.2 s.
    coordinator.pushback = 0.4
    async with running(host, host.config(coordinator)):
        await coordinator.pushbacks(3)
        coordinator.pushback = None
        session = await coordinator.session()
        assert session.hello.agent == "web-1"
    refused = coordinator.pushed_back
    # Never sooner than the hint (plus its jitter: rand 0.5 makes it 1.25 times the hint).
    gaps = [b - a for a, b in itertools.pairwise(refused[:3])]
    assert all(gap >= 0.4 * 1.25 for gap in gaps), gaps


class LinkDowns(logging.Handler):
    """The link's "link down" records, as they come (an event instead of polling the log)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self._more = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "link down":
            self.records.append(record)
            self._more.set()

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        link_log = logging.getLogger("agent.rpc.link")
        level = link_log.level
        link_log.setLevel(logging.WARNING)
        link_log.addHandler(self)
        try:
            yield
        finally:
            link_log.removeHandler(self)
            link_log.setLevel(level)

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.records) < count:
                self._more.clear()
                await self._more.wait()


def _dead_address() -> str:
    """A loopback address where nothing listens (a killed replica's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_a_replica_address_where_nothing_answers_is_passed_over_at_once(
    coordinator: Coordinator, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    """With several replicas, a dial that nothing answered (nothing listening) moves on to the
    next address without waiting out the schedule: a dead replica first in the list costs no
    backoff. On the schedule alone (base 30 s, rand 0.5) the agent would wait 15 s first."""
    caplog.set_level("WARNING", logger="agent.rpc.link")
    target = f"{_dead_address()},{coordinator.address}"
    config = host.config(coordinator, coordinator=target, backoff_base=30.0, backoff_cap=60.0)
    async with running(host, config):
        session = await coordinator.session()  # within 10 s
        assert session.hello.agent == "web-1"
    downs = [r for r in caplog.records if r.getMessage() == "link down"]
    assert [getattr(r, "delay", None) for r in downs] == ["0.000s"]
    assert "UNAVAILABLE" in getattr(downs[0], "reason", "")


async def test_each_address_is_dialed_at_most_once_between_waits(
    coordinator: Coordinator, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    """When every replica fails, the agent waits its schedule between rounds: it never dials
    one address twice without a wait in between."""
    caplog.set_level("WARNING", logger="agent.rpc.link")
    coordinator.refuse = grpc.StatusCode.UNAVAILABLE  # up, answering "unavailable"
    target = f"{_dead_address()},{coordinator.address}"
    async with running(host, host.config(coordinator, coordinator=target)):
        for _ in range(3):
            await asyncio.wait_for(coordinator.refused.get(), 10)
    delays = [getattr(r, "delay", "") for r in caplog.records if r.getMessage() == "link down"]
    # dead (at once) -> live, refused (wait) -> dead (at once) -> live, refused (wait) -> ...
    waits = [d != "0.000s" for d in delays]
    assert waits[:4] == [False, True, False, True], delays


async def test_a_replica_that_pushed_back_is_dialed_again_not_passed_over(
    coordinator: Coordinator, host: Host
) -> None:
    """Pushed back by admission control, the agent comes back to the same replica after the
    hint: it is up and said when; the other replica in the list is not dialed."""
    async with serving() as other:
        target = f"{coordinator.address},{other.address}"
        async with running(host, host.config(coordinator, coordinator=target)):
            await coordinator.enrollments.get()
            coordinator.pushback = 0.2
            await coordinator.pushbacks(2)
            coordinator.pushback = None
            session = await coordinator.session()
            assert session.hello.agent == "web-1"
        assert other.sessions.empty()
        assert other.enroll_attempts == 0


async def test_a_long_hint_is_spread_by_at_most_a_second(
    coordinator: Coordinator, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    """The coordinator gives each refused agent its own slot; the agent's own jitter on top
    stays within a second, so the last slots of a long queue are not pushed out by half again
    (rand 0.5: a 4 s hint waits 4.5 s, not 5 s)."""
    coordinator.pushback = 4.0
    downs = LinkDowns()
    with downs.watching():
        async with running(host, host.config(coordinator)):
            await downs.wait(1)
    delays = [getattr(r, "delay", "") for r in downs.records]
    assert delays[0] == "4.500s"


async def test_pushbacks_do_not_grow_the_backoff(
    coordinator: Coordinator, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    """A pushback is the coordinator's answer, not a failure: refused three times with a short
    hint, the agent waits its first backoff each time (base 1 s, rand 0.5: 0.5 s), not 0.5,
    1 and 2 s as after three failures."""
    caplog.set_level("WARNING", logger="agent.rpc.link")
    coordinator.pushback = 0.1
    async with running(host, host.config(coordinator, backoff_base=1.0, backoff_cap=60.0)):
        await coordinator.pushbacks(4)
    delays = [getattr(r, "delay", "") for r in caplog.records if r.getMessage() == "link down"]
    assert delays[:3] == ["0.500s", "0.500s", "0.500s"]
