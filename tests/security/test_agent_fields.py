"""Every field an enrolled agent sends is checked (issue 9, item C): a bad one is refused with
INVALID_ARGUMENT, audited, and the stream ends with that status; a stream never ends "OK" after
its handler failed. Driven at the wire with a raw AgentLink stream, plus a seeded fuzzer."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from jitmesh.v1 import agentlink_pb2 as A
from server.domain.batching import Answer
from server.rpc import convert
from server.rpc.agentlink import AgentLinkServicer
from tests.server.helpers import T0, AgentLink, Env, agent_link

U64 = 2**64 - 1
I64 = 2**63 - 1
GRANT = "grt-0123456789abcdef0123456789abcdef"


def stamp(seconds: int = int(T0.timestamp()), nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


def ack(**fields: object) -> A.AgentMessage:
    base: dict[str, object] = {"seq": 1, "status": A.ACK_STATUS_APPLIED, "grant_id": GRANT}
    base.update(fields)
    return A.AgentMessage(ack=A.Ack(**base))  # type: ignore[arg-type]


def event(**fields: object) -> A.AgentMessage:
    base: dict[str, object] = {"event_id": "evt-1", "kind": "note", "observed_at": stamp()}
    base.update(fields)
    return A.AgentMessage(event=A.AgentEvent(**base))  # type: ignore[arg-type]


def hello(**fields: object) -> A.AgentMessage:
    base: dict[str, object] = {"agent": "db-1", "version": "0.2.0", "boot_id": "b1"}
    base.update(fields)
    return A.AgentMessage(hello=A.Hello(**base))  # type: ignore[arg-type]


async def sync(link: AgentLink) -> None:
    """Every message sent so far was processed (events are acknowledged in order)."""
    await link.send(event(event_id="evt-sync"))
    await link.next("event_ack")


BAD_MESSAGES: dict[str, Callable[[], A.AgentMessage]] = {
    "ack with an unknown status": lambda: ack(status=99),
    "ack with no status": lambda: ack(status=0),
    "ack seq 2^64-1": lambda: ack(seq=U64),
    "ack seq 2^63": lambda: ack(seq=I64 + 1),
    "ack seq 0": lambda: ack(seq=0),
    "ack with a malformed grant id": lambda: ack(grant_id="../../etc/passwd"),
    "ack result with an unknown status": lambda: ack(
        results=[A.GrantResult(grant_id=GRANT, status=42)]  # type: ignore[arg-type]
    ),
    "ack result without a grant id": lambda: ack(
        results=[A.GrantResult(status=A.ACK_STATUS_APPLIED)]
    ),
    "ack result applied_at with negative nanos": lambda: ack(
        results=[
            A.GrantResult(grant_id=GRANT, status=A.ACK_STATUS_APPLIED, applied_at=stamp(nanos=-1))
        ]
    ),
    "batched ack with seq 2^64-1": lambda: A.AgentMessage(
        acks=A.AckBatch(acks=[A.Ack(seq=U64, status=A.ACK_STATUS_APPLIED)])
    ),
    "event observed in year 10000": lambda: event(observed_at=stamp(seconds=253_402_300_800)),
    "event observed before year 1": lambda: event(observed_at=stamp(seconds=-62_135_596_801)),
    "event with nanos out of range": lambda: event(observed_at=stamp(nanos=1_000_000_000)),
    "event counter 2^64-1": lambda: event(counter=U64),
    "event with a bad kind": lambda: event(kind="Grant Expired!"),
    "event with a malformed grant id": lambda: event(grant_id="grt-; DROP TABLE grants"),
    "an empty message": lambda: A.AgentMessage(),
    "a second Hello": lambda: hello(),
}

BAD_HELLOS: dict[str, A.AgentMessage] = {
    "hello last_applied_seq 2^64-1": hello(last_applied_seq=U64),
    "hello epoch 2^64-1": hello(epoch=U64),
    "hello agent_time with negative nanos": hello(agent_time=stamp(nanos=-5)),
    "hello with a malformed active grant id": hello(active_grant_ids=["x"]),
    "hello with a control character in its version": hello(version="0.2\n0"),
    "hello with a bad label": hello(labels={"Bad Key": "v"}),
}


@pytest.mark.parametrize("name", sorted(BAD_MESSAGES))
async def test_a_bad_field_ends_the_stream_with_invalid_argument(env: Env, name: str) -> None:
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.hello("db-1")
        await link.send(BAD_MESSAGES[name]())
        assert await link.ended() is grpc.StatusCode.INVALID_ARGUMENT
    refused = await env.admin.list_audit(kind="agent.message_refused")
    assert [(e.agent, e.actor) for e in refused] == [("db-1", "agent:db-1")]
    assert refused[0].details["why"]
    assert (await env.admin.verify_audit()).ok


@pytest.mark.parametrize("name", sorted(BAD_HELLOS))
async def test_a_bad_hello_is_refused_with_invalid_argument(env: Env, name: str) -> None:
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(BAD_HELLOS[name])
        assert await link.ended() is grpc.StatusCode.INVALID_ARGUMENT
    assert [e.agent for e in await env.admin.list_audit(kind="agent.message_refused")] == ["db-1"]
    assert not (await env.admin.get_agent("db-1")).connected


async def test_a_handler_that_fails_never_ends_the_stream_ok(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_: object) -> None:
        raise RuntimeError("store on fire")

    def written_later(_: object, __: object, answer: Answer) -> None:
        # Acks are recorded without the reader waiting (ack_later): the write fails later.
        answer(RuntimeError("store on fire"))

    monkeypatch.setattr(env.coordinator.fleet, "ack", broken)
    monkeypatch.setattr(env.coordinator.fleet, "ack_later", written_later)
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.hello("db-1")
        await link.send(ack())
        assert await link.ended() is grpc.StatusCode.INTERNAL


def _mutated(rng: random.Random) -> A.AgentMessage:
    """A message whose fields take edge values: valid ones, and out-of-range ones."""
    numbers = [0, 1, 2, 7, I64, I64 + 1, U64, rng.randrange(U64)]
    ids = ["", GRANT, "grt-x", "req-0123456789abcdef0123456789abcdef", "é" * 40, "a" * 300]
    seconds = [0, -1, int(T0.timestamp()), 253_402_300_799, 253_402_300_800, -62_135_596_801]
    nanos = [0, 999_999_999, 1_000_000_000, -1]

    def ts() -> Timestamp:
        return stamp(rng.choice(seconds), rng.choice(nanos))

    kind = rng.choice(["ack", "acks", "event", "heartbeat", "empty"])
    if kind == "ack" or kind == "acks":
        one = A.Ack(
            seq=rng.choice(numbers),
            status=rng.choice([0, 1, 2, 3, 4, 5, 6, 99]),  # type: ignore[arg-type]
            reason=rng.choice(["", "x" * 5000, "line\nbreak"]),
            grant_id=rng.choice(ids),
        )
        if rng.random() < 0.3:
            one.results.append(
                A.GrantResult(
                    grant_id=rng.choice(ids),
                    status=rng.choice([1, 2, 3, 77]),  # type: ignore[arg-type]
                    applied_at=ts(),
                )
            )
        if kind == "acks":
            return A.AgentMessage(acks=A.AckBatch(acks=[one, one]))
        return A.AgentMessage(ack=one)
    if kind == "event":
        return event(
            event_id=rng.choice(["evt-f", "", "x" * 70, "ok:1"]),
            kind=rng.choice(["note", "grant.expired", "", "X", "a" * 49]),
            grant_id=rng.choice(ids),
            observed_at=ts(),
            counter=rng.choice(numbers),
            details={rng.choice(["k", "é" * 100]): rng.choice(["v", "\x00" * 3])},
        )
    if kind == "heartbeat":
        return A.AgentMessage(heartbeat=A.Heartbeat(sent_at=ts()))
    return A.AgentMessage()


async def test_fuzzed_agent_messages_end_the_stream_only_with_a_status_that_says_why(
    env: Env,
) -> None:
    """Seeded: 150 streams, each a Hello then one random message with edge values. The stream
    either carries on (an event round trip still works) or ends with INVALID_ARGUMENT (or
    PERMISSION_DENIED for a grant that is not the agent's); never OK, UNKNOWN or INTERNAL."""
    rng = random.Random(20261206)
    endings: dict[str, int] = {}
    for _ in range(150):
        message = _mutated(rng)
        async with agent_link(env.address, env.credentials["db-1"]) as link:
            await link.hello("db-1")
            await link.send(message)
            try:
                # The coordinator may have ended the stream already (a refused message ends it
                # at once): then this write fails with InvalidStateError, and the status says why.
                await link.send(event(event_id="evt-probe"))
                while True:
                    got = await link.next("event_ack")
                    if "evt-probe" in got.event_ack.event_ids:
                        break
                outcome = "open"
            except (AssertionError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
                outcome = (await link.call.code()).name
        endings[outcome] = endings.get(outcome, 0) + 1
        assert outcome in {"open", "INVALID_ARGUMENT", "PERMISSION_DENIED"}, (outcome, message)
    # The fuzzer reached both sides.
    assert endings.get("open", 0) > 0
    assert endings.get("INVALID_ARGUMENT", 0) > 0
    assert (await env.admin.verify_audit()).ok


class WriteInFlight:
    """A stream context whose writes stay in flight until `released`, as gRPC core's do: a task
    cancelled inside `write` leaves its write in flight, and ending the stream then (the Welcome
    not yet recorded as sent) fails with TOO_MANY_OPERATIONS instead of sending the status."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.write_started = asyncio.Event()
        self.released = asyncio.Event()
        self.status: tuple[grpc.StatusCode, str] | None = None

    async def read(self) -> object:
        return await self.inbox.get()

    async def write(self, message: object) -> None:
        self.write_started.set()
        await self.released.wait()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        if self.write_started.is_set() and not self.released.is_set():
            raise RuntimeError("TOO_MANY_OPERATIONS: the stream ended while a write was in flight")
        self.status = (code, details)
        raise Aborted

    def done(self) -> bool:
        return self.status is not None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


class Aborted(Exception):
    pass


async def test_a_malformed_message_read_while_the_welcome_is_written_ends_with_its_status(
    env: Env,
) -> None:
    """The reader refuses a message while the writer's Welcome is still in flight: the stream
    ends with INVALID_ARGUMENT only after that write finished (one writer per stream), never with
    the writer cancelled mid-write and a second operation on the stream."""
    coordinator = env.coordinator
    servicer = AgentLinkServicer(
        coordinator.fleet, coordinator.registry, coordinator.clock, coordinator.keys
    )
    principal = await coordinator.fleet.authenticate_agent(env.credentials["db-1"])
    agent_hello = convert.hello(hello().hello)
    resume = await coordinator.fleet.hello(principal, agent_hello)
    context = WriteInFlight()
    serving = asyncio.create_task(
        servicer._serve(context, principal, agent_hello, resume)  # type: ignore[arg-type]
    )
    async with asyncio.timeout(10):
        await context.write_started.wait()
        session = next(s for s in coordinator.registry.sessions() if s.agent == "db-1")
        await context.inbox.put(A.AgentMessage())  # empty: refused
        await session.closed
        # Until the servicer either asks the writer to stop or ends the stream at once.
        while not (getattr(session, "stopping", False) or serving.done()):
            await asyncio.sleep(0)
        context.released.set()
        with pytest.raises(Aborted):
            await serving
    assert context.status == (grpc.StatusCode.INVALID_ARGUMENT, "unknown or empty agent message")
