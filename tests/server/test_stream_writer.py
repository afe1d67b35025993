"""The per-stream writer's queue: bounded, in order, one wake for everything queued, and woken
again for what is offered after it went idle. Driven through a real stream where the wire is
what matters, and through `Session` alone where the order of events must be exact."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from jitmesh.v1 import agentlink_pb2
from server.domain import errors
from server.rpc.agentlink import ACKS_IN_FLIGHT, Session, _AckWrites
from tests.server.helpers import WAIT, Env, agent_link

FULL = "outbound queue full (slow agent); it will resync"


def event_ack(event_id: str) -> agentlink_pb2.CoordinatorMessage:
    return agentlink_pb2.CoordinatorMessage(event_ack=agentlink_pb2.EventAck(event_ids=[event_id]))


@pytest.fixture
def idle(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Set each time a writer finds its queue empty and is about to wait (`Session.take`)."""
    entered = asyncio.Event()
    take = Session.take

    async def noted(self: Session) -> object:
        entered.set()
        return await take(self)

    monkeypatch.setattr(Session, "take", noted)
    return entered


def event_id(item: object) -> str:
    assert isinstance(item, agentlink_pb2.CoordinatorMessage)
    return item.event_ack.event_ids[0]


def session_of(env: Env, agent: str) -> Session:
    return next(s for s in env.coordinator.registry.sessions() if s.agent == agent)


async def test_items_offered_together_are_written_in_order_and_a_later_offer_wakes_it(
    env: Env, idle: asyncio.Event
) -> None:
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.hello("db-1")
        session = session_of(env, "db-1")
        for batch in (["a1", "a2", "a3", "a4"], ["b1"], ["c1", "c2"]):
            # The writer is waiting on an empty queue: one wake for the whole batch.
            async with asyncio.timeout(WAIT):
                await idle.wait()
            idle.clear()
            assert session.idle is not None
            for event_id in batch:
                session.offer(event_ack(event_id))
            assert session.idle is None
            written = [(await link.next("event_ack")).event_ack.event_ids[0] for _ in batch]
            assert written == batch


async def test_an_overflowing_queue_cuts_the_stream_off(env: Env, idle: asyncio.Event) -> None:
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.hello("db-1")
        session = session_of(env, "db-1")
        async with asyncio.timeout(WAIT):
            await idle.wait()
        session.limit = 3
        for i in range(3):
            session.offer(event_ack(f"e{i}"))
        assert not session.closed.done()
        session.offer(event_ack("one too many"))
        assert session.closed.done()
        assert len(session.queue) == 3
        assert await link.ended() == grpc.StatusCode.UNAVAILABLE
        assert await link.call.details() == FULL


async def test_the_bound_counts_what_the_writer_has_not_taken() -> None:
    session = Session("web-1", 2)
    session.offer(event_ack("e1"))
    session.offer(event_ack("e2"))
    taken = await session.take()
    assert event_id(taken) == "e1"
    # One taken: one more fits, and the one after that is too many.
    session.offer(event_ack("e3"))
    assert not session.closed.done()
    session.offer(event_ack("e4"))
    assert session.close_reason == FULL
    assert [event_id(m) for m in session.queue] == ["e2", "e3"]


async def test_a_writer_cancelled_while_idle_leaves_no_waiter_behind() -> None:
    session = Session("web-1", 10)
    waiting = asyncio.ensure_future(session.take())
    await asyncio.sleep(0)
    assert session.idle is not None
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert session.idle is None
    # Offers after it are kept for nobody, without error, up to the bound.
    session.offer(event_ack("e1"))
    assert len(session.queue) == 1
    assert not session.closed.done()


async def test_an_idle_writer_is_woken_once_for_items_offered_together() -> None:
    session = Session("web-1", 10)
    waiting = asyncio.ensure_future(session.take())
    await asyncio.sleep(0)
    first = session.idle
    assert first is not None
    for i in range(3):
        session.offer(event_ack(f"e{i}"))
    assert session.idle is None
    assert first.done()
    async with asyncio.timeout(WAIT):
        got = [await waiting, await session.take(), await session.take()]
    assert [event_id(m) for m in got] == ["e0", "e1", "e2"]
    # Drained: the next take waits again on a new future, which the next offer answers.
    again = asyncio.ensure_future(session.take())
    await asyncio.sleep(0)
    assert session.idle is not None
    assert session.idle is not first
    session.offer(event_ack("e3"))
    async with asyncio.timeout(WAIT):
        assert event_id(await again) == "e3"


async def test_the_reader_waits_for_room_among_its_acks_being_written() -> None:
    session = Session("web-1", 10)
    writing = _AckWrites(session)
    writing.in_flight = ACKS_IN_FLIGHT + 2
    room = asyncio.ensure_future(writing.room())
    await asyncio.sleep(0)
    writing.written(None)
    await asyncio.sleep(0)
    assert not room.done()
    # Not written because the batch's writer was cancelled (shutdown): no close of its own.
    writing.written(asyncio.CancelledError())
    async with asyncio.timeout(WAIT):
        await room
    assert writing.in_flight == ACKS_IN_FLIGHT
    assert not session.closed.done()


async def test_a_refused_ack_write_ends_the_stream_with_the_refusals_status() -> None:
    session = Session("web-1", 10)
    writing = _AckWrites(session)
    writing.in_flight = 2
    writing.written(errors.PermissionDenied("ack names another agent's grant"))
    assert session.close_code == grpc.StatusCode.PERMISSION_DENIED
    assert session.close_reason == "ack names another agent's grant"
    # A later failure does not replace the first reason.
    writing.written(RuntimeError("store on fire"))
    assert session.close_code == grpc.StatusCode.PERMISSION_DENIED
    assert writing.in_flight == 0


async def test_an_agent_gone_during_a_write_is_a_disconnect_not_a_failure(env: Env) -> None:
    """An agent whose connection goes while a write to it is in flight (thousands at once when a
    fleet's host or network fails) makes that write fail in gRPC core; the stream ended, nothing
    on the coordinator failed: one "agent disconnected" line, no warning, no INTERNAL reason."""
    records: list[logging.LogRecord] = []
    disconnected = asyncio.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)
            if record.getMessage() == "agent disconnected":
                disconnected.set()

    seen = Seen(logging.DEBUG)
    logger = logging.getLogger("server.rpc.agentlink")
    logger.addHandler(seen)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        async with agent_link(env.address, env.credentials["db-1"]) as link:
            await link.hello("db-1")
            session = session_of(env, "db-1")
            session.limit = 50_000
            # About 20 MB the agent never reads: far more than HTTP/2's windows hold, so the
            # writer is inside a write (blocked on flow control) when the agent goes.
            for i in range(20_000):
                session.offer(event_ack(f"{i:0>1000}"))
            await link.next("event_ack")
            assert session.writing
        async with asyncio.timeout(WAIT):
            await disconnected.wait()
    finally:
        logger.removeHandler(seen)
        logger.setLevel(level)
    ended = next(r for r in records if r.getMessage() == "agent disconnected")
    assert not [r for r in records if r.levelno >= logging.WARNING], [
        r.getMessage() for r in records if r.levelno >= logging.WARNING
    ]
    assert "stream error" not in getattr(ended, "reason", "")
