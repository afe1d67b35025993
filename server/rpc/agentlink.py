"""AgentLink.Connect: the stream each agent keeps open.

Per stream: one reader (acks, events, heartbeats from the agent) and one writer, fed by one
bounded queue, so nothing else ever writes to the stream. The writer first replays the agent's
command log from where the agent's Hello says it stopped (or sends a snapshot), then forwards
commands pushed live after each commit. A live command that does not follow the last one sent
makes the writer re-read the log, so nothing is skipped. An agent whose queue overflows is cut
off; it reconnects and resyncs from the log instead of growing the coordinator's memory.

The queue is a plain deque (`Session.offer`): an idle writer is woken once, and then writes
everything queued by then and since, in order, before it waits again. A queue hop per item
(`asyncio.Queue`: a future per item taken while empty, an Event cleared per put) was part of
the writers' cost in a fleet-wide revoke (docs/performance.md, "Where the time goes").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import grpc

from jitmesh import telemetry as t
from jitmesh.clock import Clock
from jitmesh.keyset import breakglass_keys_bytes, key_entries, keys_bytes
from jitmesh.v1 import agentlink_pb2, agentlink_pb2_grpc, agents_pb2
from jitmesh.versions import older_than
from server.ca import CertificateError, agent_of
from server.domain import errors
from server.domain.admission import MIN_HINT, Admission
from server.domain.fleet import BACKLOG_PAGE, FleetService
from server.domain.models import AgentHello, Command, CommandKind, Principal, Resume
from server.signing import SigningKeys

from . import convert as c
from .auth import CERT_PREFIX, bearer, cert_binding, peer_certificate
from .errors import abort, admission_hint, retry_metadata, status_of

log = logging.getLogger(__name__)
Ctx = grpc.aio.ServicerContext[agentlink_pb2.AgentMessage, agentlink_pb2.CoordinatorMessage]
HELLO_TIMEOUT = 10.0
# How long a stream refused by admission control waits for the agent's Hello before the refusal.
PUSHBACK_READ = 5.0
# Agent messages are small (acks, events, heartbeats); anything bigger is an attack or a bug.
MAX_AGENT_MESSAGE = 64 * 1024
# Ack messages of one stream read on while earlier ones are still being written.
ACKS_IN_FLIGHT = 64
# How long a stream that is ending waits for the write in flight (see `_stop_writer`).
WRITE_GRACE = 2.0
# How often the usable break-glass codes are read again for Welcomes. A read up to this old is
# safe: a code's key is among the command keys (which verify codes too) for ROTATION_OVERLAP
# after its rotation, far longer, and a used code's key lingers this long at most.
BREAKGLASS_REFRESH = 60.0
# grpc-stubs predates the aio EOF sentinel.
EOF = grpc.aio.EOF  # type: ignore[attr-defined]


class Wake:
    """Queued for a stream when another replica committed commands for its agent (a hint from
    the store): the writer re-reads the log after the last command it sent."""

    __slots__ = ()


WAKE = Wake()


Item = agentlink_pb2.CoordinatorMessage | Command | Wake


class Session:
    # Thousands of these live at once: no per-instance __dict__, and a bare future to wait on
    # for the close rather than an Event plus a task waiting on it (docs/performance.md).
    __slots__ = (
        "agent",
        "close_code",
        "close_reason",
        "closed",
        "idle",
        "legacy",
        "limit",
        "queue",
        "stopping",
        "writing",
    )

    def __init__(self, agent: str, queue_limit: int) -> None:
        self.agent = agent
        # An agent older than wire 0.2 (docs/wire.md, "Mixed versions").
        self.legacy = False
        # Items offered and not yet taken by the writer, at most `limit` (as asyncio.Queue's
        # bound: the item being written is not counted).
        self.queue: collections.deque[Item] = collections.deque()
        self.limit = queue_limit
        # Set by the writer when it found the queue empty and waits; the first offer after
        # answers it and clears it, so a wake costs one future however many items follow.
        self.idle: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_reason = ""
        self.close_code = grpc.StatusCode.UNAVAILABLE
        # The writer is inside context.write; once `stopping`, it returns after that write.
        self.writing = False
        self.stopping = False

    def offer(self, item: Item) -> None:
        queue = self.queue
        if len(queue) >= self.limit:
            self.close("outbound queue full (slow agent); it will resync")
            return
        queue.append(item)
        idle = self.idle
        if idle is not None:
            self.idle = None
            if not idle.done():  # not cancelled with the writer
                idle.set_result(None)

    async def take(self) -> Item:
        """The oldest item offered; waits (one future) only when there is none."""
        queue = self.queue
        while not queue:
            # The loop from `closed`: get_running_loop calls getpid on Python 3.11.
            idle = self.idle = self.closed.get_loop().create_future()
            try:
                await idle
            finally:
                # Cancelled while idle: an offer must not answer a future nobody awaits.
                if self.idle is idle:
                    self.idle = None
        return queue.popleft()

    def close(self, reason: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        if not self.closed.done():
            self.close_reason = reason
            self.close_code = code
            self.closed.set_result(None)


class LinkRegistry:
    """The connected agents of this coordinator process; also the domain's CommandSink."""

    def __init__(self, queue_limit: int = 1000) -> None:
        self.queue_limit = queue_limit
        self._sessions: dict[str, Session] = {}

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def push(self, commands: Sequence[Command]) -> None:
        for command in commands:
            session = self._sessions.get(command.agent)
            if session is not None:
                session.offer(command)

    def connected(self, agent: str) -> bool:
        return agent in self._sessions

    def wake(self, agents: Sequence[str] | None) -> None:
        """Commands for `agents` (None: for any agent, notifications may have been missed) were
        committed elsewhere: their streams here re-read the log."""
        if agents is None:
            sessions = list(self._sessions.values())
        else:
            sessions = [s for a in agents if (s := self._sessions.get(a)) is not None]
        for session in sessions:
            session.offer(WAKE)

    def count(self) -> int:
        return len(self._sessions)

    def disconnect(self, agent: str, reason: str) -> None:
        session = self._sessions.get(agent)
        if session is not None:
            session.close(reason)

    def register(self, session: Session) -> None:
        old = self._sessions.get(session.agent)
        if old is not None:
            old.close("replaced by a newer stream from the same agent")
        self._sessions[session.agent] = session

    def unregister(self, session: Session) -> None:
        if self._sessions.get(session.agent) is session:
            del self._sessions[session.agent]

    def close_all(self, reason: str) -> None:
        for session in list(self._sessions.values()):
            session.close(reason)


class AgentLinkServicer(agentlink_pb2_grpc.AgentLinkServicer):
    def __init__(
        self,
        fleet: FleetService,
        registry: LinkRegistry,
        clock: Clock,
        keys: SigningKeys,
        heartbeat: timedelta = timedelta(seconds=10),
        *,
        require_certificate: bool = False,
        admission: Admission | None = None,
    ) -> None:
        # Streams are admitted at the pace the coordinator takes (admission.py); None: all.
        self._admission = admission
        self._keys = keys
        # The Welcome's fields that are the same for every agent, with what they were made
        # from (the valid public keys and the epoch): see `_welcome_template`.
        self._template: tuple[tuple[object, ...], agentlink_pb2.Welcome] | None = None
        # Per agent, the keys of its usable break-glass codes with their latest expiry, and the
        # monotonic time they were read (None: never); one read at a time.
        self._breakglass_ends: dict[str, dict[str, datetime]] = {}
        self._breakglass_read_at: float | None = None
        self._breakglass_reading = asyncio.Lock()
        self._ticker: asyncio.Task[None] | None = None
        self._streams = 0
        # With mTLS, identity comes only from the verified client certificate.
        self._require_certificate = require_certificate
        self._fleet = fleet
        self._registry = registry
        self._clock = clock
        self._heartbeat = heartbeat

    async def Connect(self, request_iterator: Any, context: Ctx) -> None:  # type: ignore[override]
        admission = self._admission
        admitted = self._clock.monotonic()
        if admission is not None:
            wait = admission.admit(admitted)
            if wait is not None:
                await self._push_back(context, wait)
        try:
            principal, hello, resume = await self._handshake(context)
        finally:
            if admission is not None:
                admission.welcomed(admitted, self._clock.monotonic())
        await self._serve(context, principal, hello, resume)

    async def _push_back(self, context: Ctx, seconds: float) -> None:
        """Refuse the stream for now: the hint in-stream, then RESOURCE_EXHAUSTED (with the
        hint in the status details too, for clients that do not read the stream)."""
        refused_at = self._clock.monotonic()
        with contextlib.suppress(Exception):
            # The agent's Hello first (it is on its way already): a stream refused while the
            # agent is still writing it can reach the agent as INTERNAL, without the status or
            # the hint, and the agent then dials again on its own schedule. A saturated agent
            # side takes more than a second to send it (1 s: 1,395 of 3,160 refusals reached
            # agents as INTERNAL in a 10,000-agent failover).
            async with asyncio.timeout(PUSHBACK_READ):
                await context.read()
        # The slot stays where it was: the time spent waiting for the Hello comes off the hint.
        hint = admission_hint(max(MIN_HINT, seconds - (self._clock.monotonic() - refused_at)))
        with contextlib.suppress(Exception):
            await context.write(agentlink_pb2.CoordinatorMessage(pushback=hint))
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            hint.reason,
            trailing_metadata=retry_metadata(hint, "BUSY"),
        )

    async def _handshake(self, context: Ctx) -> tuple[Principal, AgentHello, Resume]:
        """The credential, the Hello, and where the agent's log resumes."""
        principal: Principal | None = None
        try:
            principal = await self._fleet.authenticate_agent(self._credential(context))
            async with asyncio.timeout(HELLO_TIMEOUT):
                first = await context.read()
            if (
                isinstance(first, agentlink_pb2.AgentMessage)
                and first.ByteSize() > MAX_AGENT_MESSAGE
            ):
                raise errors.InvalidArgument("message too large")
            if not isinstance(first, agentlink_pb2.AgentMessage) or not first.HasField("hello"):
                raise errors.InvalidArgument("the first message must be a Hello")
            hello = c.hello(first.hello)
            resume = await self._fleet.hello(principal, hello)
        except errors.DomainError as exc:
            if principal is not None and isinstance(exc, errors.InvalidArgument):
                await self._refused(principal, exc)
            await abort(context, exc)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no Hello in time")
        return principal, hello, resume

    async def _serve(
        self, context: Ctx, principal: Principal, hello: AgentHello, resume: Resume
    ) -> None:
        session = Session(principal.name, self._registry.queue_limit)
        session.legacy = older_than(hello.version, 0, 2)
        self._registry.register(session)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "agent connected",
                extra={
                    t.AGENT: session.agent,
                    t.PEER: context.peer(),
                    t.SEQ: resume.resume_after_seq,
                },
            )
        self._streams += 1
        if self._ticker is None or self._ticker.done():
            # One heartbeat task for all streams, not one per stream: it lives while any stream
            # does (the last stream to end cancels it).
            self._ticker = asyncio.create_task(self._tick())
        reader = asyncio.create_task(self._read(principal, session, context))
        writer = asyncio.create_task(self._write(session, resume, context))
        tasks = [reader, writer]
        try:
            await asyncio.wait([*tasks, session.closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            results: list[Any] | None = None
            try:
                # The writer stops between writes, so that the abort below is the only
                # operation left on the stream (one writer per stream).
                await _stop_writer(session, writer)
                results = await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                if results is None:
                    # This handler was cancelled while it stopped them (the server stopping):
                    # their outcomes are still collected, and the session still goes.
                    for task in tasks:
                        task.add_done_callback(_collect)
                self._registry.unregister(session)
                self._streams -= 1
                if self._streams == 0 and self._ticker is not None:
                    self._ticker.cancel()
                    self._ticker = None
            failure = _failure(results)
            if failure and not session.close_reason:
                # A handler that failed never ends the stream "OK".
                session.close(failure, grpc.StatusCode.INTERNAL)
            reason = session.close_reason or "stream ended"
            log.info("agent disconnected", extra={t.AGENT: session.agent, t.REASON: reason})
            with contextlib.suppress(Exception):
                await asyncio.shield(self._fleet.disconnected(principal, reason))
        if session.close_reason and not context.done():
            await context.abort(session.close_code, session.close_reason)

    async def _read(self, principal: Principal, session: Session, context: Ctx) -> None:
        # Acks being written: the reader goes on reading while they are group-committed
        # (recorded in the order read), up to ACKS_IN_FLIGHT messages; a failed write ends the
        # stream (`_AckWrites.written`) as a refused message does.
        writing = _AckWrites(session)
        while True:
            message = await context.read()
            if message is EOF:
                session.close("agent closed the stream")
                return
            assert isinstance(message, agentlink_pb2.AgentMessage)
            kind = message.WhichOneof("body")
            try:
                if message.ByteSize() > MAX_AGENT_MESSAGE:
                    raise errors.InvalidArgument("message too large")
                if kind in ("ack", "acks"):
                    # An AckBatch: several commands applied in one commit (docs/wire.md), each
                    # ack as if alone, in order, written together.
                    acks = (
                        [c.ack(message.ack, legacy=session.legacy)]
                        if kind == "ack"
                        else [c.ack(one, legacy=session.legacy) for one in message.acks.acks]
                    )
                    if any(ack.results for ack in acks):
                        # A snapshot's ack (rare): its results are checked against the agent's
                        # grants first, then it is written in its turn.
                        for ack in acks:
                            await self._fleet.ack(principal, ack)
                    elif acks:
                        writing.in_flight += 1
                        self._fleet.ack_later(principal, acks, writing.written)
                        if writing.in_flight > ACKS_IN_FLIGHT:
                            await writing.room()
                elif kind == "event":
                    await self._fleet.observed(principal, c.observation(message.event))
                    session.offer(
                        agentlink_pb2.CoordinatorMessage(
                            event_ack=agentlink_pb2.EventAck(event_ids=[message.event.event_id])
                        )
                    )
                elif kind == "hello":
                    raise errors.InvalidArgument("Hello may only be sent once")
                elif kind != "heartbeat":
                    raise errors.InvalidArgument("unknown or empty agent message")
            except errors.DomainError as exc:
                if isinstance(exc, errors.InvalidArgument):
                    await self._refused(principal, exc)
                # A refused message ends the stream with its status: an agent acting for another
                # is cut off at once, not merely refused, and a malformed message is not skipped
                # silently (the agent would believe it delivered).
                session.close(exc.message, status_of(exc))
                return

    async def _refused(self, principal: Principal, exc: errors.DomainError) -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(self._fleet.message_refused(principal, exc.message))

    def _credential(self, context: Ctx) -> str:
        if self._require_certificate:
            # The agent port with TLS asks every client for a certificate from the CA; without
            # TLS (`require_certificate` off: app.py) no call can carry one, so the auth
            # context (a dict built per call) is not read there.
            pem = peer_certificate(context)
            if pem is None:
                raise errors.Unauthenticated("AgentLink needs a client certificate from the CA")
            try:
                name, serial = agent_of(pem)
            except CertificateError as exc:
                raise errors.Unauthenticated(str(exc)) from None
            # Only the agent's current certificate is bound: a removed agent's, or one replaced
            # by renewal or re-enrollment, no longer authenticates.
            return cert_binding(name, serial)
        credential = bearer(context)
        if credential.startswith(CERT_PREFIX):
            # Certificate bindings are derived from public data: never accepted as a bearer.
            raise errors.Unauthenticated("agent credential is not valid")
        return credential

    def _welcome_template(self) -> agentlink_pb2.Welcome:
        """The Welcome's fields that are the same for every agent: version, epoch, heartbeat
        interval, replica, and the valid public keys signed with the oldest valid key (agents
        adopt a rotated key only on a signature by a key they already trust). Made again only
        when the valid keys (a rotation, a reload, a retired key past its overlap) or the epoch
        change: the signer is the oldest of the same valid keys, and Ed25519 signatures are
        deterministic, so the same list signed by the same key gives the same bytes. Each
        Welcome copies it and adds the agent's own fields (`_write`): ten thousand agents
        reconnecting built and signed it ten thousand times."""
        now = self._clock.now()
        public = self._keys.public_keys(now)
        made_of = (*public, self._fleet.epoch)
        cached = self._template
        if cached is not None and cached[0] == made_of:
            return cached[1]
        listed = [
            agents_pb2.SigningKey(
                key_id=k.key_id,
                public_key=k.public_raw,
                not_after=c.ts(k.not_after) if k.not_after else None,
            )
            for k in public
        ]
        keys_key_id, keys_signature = self._keys.sign_with_oldest(
            keys_bytes(key_entries(listed)), now
        )
        template = agentlink_pb2.Welcome(
            version=self._fleet.version,
            epoch=self._fleet.epoch,
            heartbeat_interval=c.dur(self._heartbeat),
            signing_keys=listed,
            keys_key_id=keys_key_id,
            keys_signature=keys_signature,
            replica=self._fleet.replica,
        )
        self._template = (made_of, template)
        return template

    async def _breakglass_keys(
        self, agent: str, keys_key_id: str, at_ms: int
    ) -> tuple[list[agents_pb2.SigningKey], bytes]:
        """The retired keys that signed `agent`'s usable break-glass codes, each valid until the
        last of those codes expires, for codes only; signed by `keys_key_id`, the key that
        signed the key list, together with the agent's name and the Welcome's time `at_ms`
        (docs/wire.md, "Break-glass codes"). Always sent, empty too, so an agent drops the keys
        whose codes were all used. One signature per Welcome (about 21 us): the bytes name the
        agent and the instant, so there is nothing to share between Welcomes."""
        ends: dict[str, datetime] = {}
        if self._keys.retired():
            # Without a retired key, no code can outlive its key: nothing to read.
            ends = (await self._key_ends()).get(agent, {})
        listed = [
            agents_pb2.SigningKey(
                key_id=k.key_id,
                public_key=k.public_raw,
                not_after=c.ts(k.not_after) if k.not_after else None,
            )
            for k in self._keys.breakglass_keys(ends, self._clock.now())
        ]
        data = breakglass_keys_bytes(key_entries(listed), agent=agent, at_ms=at_ms)
        return listed, self._keys.sign_with(keys_key_id, data)

    async def _key_ends(self) -> dict[str, dict[str, datetime]]:
        async with self._breakglass_reading:
            now = self._clock.monotonic()
            read_at = self._breakglass_read_at
            if read_at is None or now - read_at >= BREAKGLASS_REFRESH:
                self._breakglass_ends = await self._fleet.breakglass_key_ends()
                self._breakglass_read_at = now
            return self._breakglass_ends

    async def _write(self, session: Session, resume: Resume, context: Ctx) -> None:
        epoch = self._fleet.epoch
        message = agentlink_pb2.CoordinatorMessage()
        welcome = message.welcome
        welcome.CopyFrom(self._welcome_template())
        coordinator_time = c.ts(self._clock.now())
        assert coordinator_time is not None
        welcome.coordinator_time.CopyFrom(coordinator_time)
        welcome.resume_after_seq = resume.resume_after_seq
        welcome.agent = session.agent
        breakglass_keys, breakglass_signature = await self._breakglass_keys(
            # The instant exactly as the Welcome carries it (what the agent reads back).
            session.agent,
            welcome.keys_key_id,
            welcome.coordinator_time.ToMilliseconds(),
        )
        welcome.breakglass_keys.extend(breakglass_keys)
        welcome.breakglass_keys_signature = breakglass_signature
        await _send(session, context, message)
        last = resume.resume_after_seq
        if resume.snapshot is not None:
            body = c.snapshot_body(
                session.agent,
                resume.snapshot_seq,
                resume.snapshot,
                epoch,
                self._clock.now(),
                resume.tombstones,
                # A 0.1 agent cannot read locks: its snapshot says nothing of them.
                None if session.legacy else resume.locks,
                self._fleet.replica,
            )
            await _send(session, context, self._command(resume.snapshot_seq, body))
            last = resume.snapshot_seq
        last = await self._replay(session, last, context)
        while True:
            queue = session.queue
            # Everything queued is taken without a wait; only an empty queue waits (`take`).
            item = queue.popleft() if queue else await session.take()
            if isinstance(item, Wake):
                last = await self._replay(session, last, context)
                continue
            if not isinstance(item, Command):
                await _send(session, context, item)
                continue
            if item.seq <= last:
                continue
            if item.seq > last + 1:
                last = await self._replay(session, last, context)
                continue
            if not _sendable(session, item):
                last = item.seq
                continue
            body = c.command_body(item, epoch, self._clock.now(), self._fleet.replica)
            await _send(session, context, self._command(item.seq, body))
            last = item.seq

    async def _replay(self, session: Session, last: int, context: Ctx) -> int:
        epoch = self._fleet.epoch
        while True:
            page = await self._fleet.backlog(session.agent, last)
            for command in page:
                if not _sendable(session, command):
                    last = command.seq
                    continue
                body = c.command_body(command, epoch, self._clock.now(), self._fleet.replica)
                await _send(session, context, self._command(command.seq, body))
                last = command.seq
            if len(page) < BACKLOG_PAGE:
                return last

    async def _tick(self) -> None:
        while True:
            await self._clock.sleep(self._heartbeat.total_seconds())
            beat = agentlink_pb2.CoordinatorMessage(
                heartbeat=agentlink_pb2.Heartbeat(sent_at=c.ts(self._clock.now()))
            )
            for session in self._registry.sessions():
                session.offer(beat)

    def _command(
        self, seq: int, body: agentlink_pb2.CommandBody
    ) -> agentlink_pb2.CoordinatorMessage:
        # The signature covers the exact bytes sent: agent, epoch, seq, issue time and the grant
        # with its window. The agent checks it before it parses the body.
        data = body.SerializeToString(deterministic=True)
        key_id, signature = self._keys.sign(data)
        # Filled in place: a Command built apart is copied into its envelope (1.3 -> 0.5 us).
        message = agentlink_pb2.CoordinatorMessage()
        command = message.command
        command.seq = seq
        command.body = data
        command.key_id = key_id
        command.signature = signature
        return message


class _Stopped(Exception):
    """The writer was asked to stop while it wrote: it ends after that write."""


async def _send(session: Session, context: Ctx, message: agentlink_pb2.CoordinatorMessage) -> None:
    session.writing = True
    try:
        await context.write(message)
    finally:
        session.writing = False
    if session.stopping:
        raise _Stopped


async def _stop_writer(session: Session, writer: asyncio.Task[None]) -> None:
    """Stop the stream's writer before the stream is ended.

    Cancelling a task inside `context.write` does not cancel the write: its batch stays in flight
    in gRPC core, and on the stream's first write (the Welcome) the servicer context has not yet
    recorded the initial metadata as sent, so `context.abort` sends it a second time and fails
    with TOO_MANY_OPERATIONS instead of ending the stream with its status (seen with a malformed
    message read while the Welcome was being written). So a write in flight is let finish (the
    writer returns after it); an idle writer (waiting on its queue or the store) is cancelled.
    A write still blocked after WRITE_GRACE (an agent that stopped reading, past its first
    message) is cancelled too: the stream's initial metadata went out with that first message."""
    session.stopping = True
    if session.writing and not writer.done():
        await asyncio.wait([writer], timeout=WRITE_GRACE)
    writer.cancel()


def _sendable(session: Session, command: Command) -> bool:
    """A 0.1 agent cannot parse lock commands (none are written for an agent known to be 0.1;
    one written while it was not, is settled at its Hello, `locks.settle_unsent`, and skipped
    here: its revokes still come)."""
    return not (session.legacy and command.kind in (CommandKind.LOCK, CommandKind.UNLOCK))


class _AckWrites:
    """A stream's ack messages being group-committed (`FleetService.ack_later`): counted, and
    answered by one call each from the batch's writer, not a future each (a future, two
    callbacks and two event-loop turns per ack in a fleet-wide revoke)."""

    __slots__ = ("in_flight", "session", "waiter")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.in_flight = 0
        # Set while the reader waits for the in-flight messages to drop to ACKS_IN_FLIGHT.
        self.waiter: asyncio.Future[None] | None = None

    async def room(self) -> None:
        while self.in_flight > ACKS_IN_FLIGHT:
            waiter = self.waiter = self.session.closed.get_loop().create_future()
            await waiter

    def written(self, failure: BaseException | None) -> None:
        """One message's acks are durable, or were not written: end the stream with the
        refusal's status for a refused ack (another agent's grant named), as the reader does
        for any refused message."""
        self.in_flight -= 1
        if failure is not None and not isinstance(failure, asyncio.CancelledError):
            session = self.session
            if isinstance(failure, errors.DomainError):
                session.close(failure.message, status_of(failure))
            else:
                log.warning("recording an agent's acks failed: %r", failure)
                session.close(f"stream error: {type(failure).__name__}", grpc.StatusCode.INTERNAL)
        waiter = self.waiter
        if waiter is not None and self.in_flight <= ACKS_IN_FLIGHT:
            self.waiter = None
            if not waiter.done():  # not cancelled with the reader
                waiter.set_result(None)


def _collect(task: asyncio.Task[None]) -> None:
    """A stream task's outcome once nobody awaits it: a failure is logged like `_failure`'s."""
    if not task.cancelled():
        _failure([task.exception()])


def _failure(results: list[Any]) -> str:
    """The reason a stream's task failed ("" if none did), logged as a warning; a write that
    failed because the stream had ended under it is the agent gone, not a fault."""
    for result in results:
        if isinstance(result, BaseException) and not isinstance(
            result, asyncio.CancelledError | _Stopped
        ):
            if _ended_under_write(result):
                log.debug("the stream ended while a write was in flight: %r", result)
                return "stream ended during a write"
            log.warning("agent stream task failed: %r", result)
            return f"stream error: {type(result).__name__}"
    return ""


def _ended_under_write(exc: BaseException) -> bool:
    """gRPC core completed a write batch without success: the call was over by then (the
    agent's connection went, it cancelled, or the server is stopping), and thousands of agents
    leaving at once must not log a warning each. A write that gRPC refused to start (e.g. two
    writes at once, a bug of ours) says "Failed grpc_call_start_batch" instead and stays a
    warning. grpc.aio has no public type for the difference; the message is grpcio's
    `CallbackFailureHandler` for `execute_batch` (tests/server/test_stream_writer.py)."""
    return isinstance(exc, grpc.aio.InternalError) and str(exc).startswith('Failed "execute_batch"')
