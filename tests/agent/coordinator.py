"""A scripted coordinator for link tests: a real grpc.aio server on 127.0.0.1, port 0."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

import jitmesh
from jitmesh.v1 import agentlink_pb2, agents_pb2, types_pb2
from jitmesh.v1.agentlink_pb2_grpc import AgentLinkServicer, add_AgentLinkServicer_to_server
from jitmesh.v1.agents_pb2_grpc import AgentsServicer, add_AgentsServicer_to_server
from server.rpc.errors import retry_metadata

AgentMessage = agentlink_pb2.AgentMessage
CoordinatorMessage = agentlink_pb2.CoordinatorMessage
# The servicer stubs type the context per method; the fake does not need that precision.
_Context = grpc.aio.ServicerContext[Any, Any]
_Outgoing = CoordinatorMessage | grpc.StatusCode | None
# The fake's command-signing key: handed out at enrollment, used by `command()`.
SIGNING_KEY = Ed25519PrivateKey.generate()
KEY_ID = "fake-key-1"
PUBLIC_KEY = SIGNING_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def ts(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


@dataclass
class Session:
    """One Connect stream, as the coordinator sees it."""

    authorization: str
    hello: agentlink_pb2.Hello
    acks: asyncio.Queue[agentlink_pb2.Ack] = field(default_factory=asyncio.Queue)
    events: asyncio.Queue[agentlink_pb2.AgentEvent] = field(default_factory=asyncio.Queue)
    heartbeats: asyncio.Queue[agentlink_pb2.Heartbeat] = field(default_factory=asyncio.Queue)
    outgoing: asyncio.Queue[_Outgoing] = field(default_factory=asyncio.Queue)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def send(self, message: CoordinatorMessage) -> None:
        self.outgoing.put_nowait(message)

    def end(self, status: grpc.StatusCode | None = None) -> None:
        """Close the stream: OK (None) or with an error status."""
        self.outgoing.put_nowait(status)

    async def ack(self) -> agentlink_pb2.Ack:
        async with asyncio.timeout(10):
            return await self.acks.get()

    async def event(self) -> agentlink_pb2.AgentEvent:
        async with asyncio.timeout(10):
            return await self.events.get()

    async def command(self, body: agentlink_pb2.CommandBody) -> agentlink_pb2.Ack:
        """Send one command and wait for its ack."""
        self.send(command(body))
        return await self.ack()


class Coordinator(AgentLinkServicer, AgentsServicer):
    def __init__(self) -> None:
        self.address = ""
        self.sessions: asyncio.Queue[Session] = asyncio.Queue()
        self.enrollments: asyncio.Queue[agents_pb2.EnrollRequest] = asyncio.Queue()
        self.credentials: set[str] = set()
        self.join_tokens: set[str] = {"join-1", "join-2"}
        # While set, every Connect is refused with this status (the coordinator is "down").
        self.refuse: grpc.StatusCode | None = None
        self.refuse_details = "coordinator is down"
        self.refused: asyncio.Queue[str] = asyncio.Queue()
        self.ack_events = True
        self.epoch = 7
        self.heartbeat_interval: Duration | None = None
        # Merged into every Welcome (e.g. announced signing keys).
        self.welcome_extra: agentlink_pb2.Welcome | None = None
        # While set, streams are accepted but never welcomed.
        self.silent = False
        # While set, streams are refused by admission control: this many seconds in the
        # in-stream RetryHint, then RESOURCE_EXHAUSTED; each refusal's monotonic time is kept.
        self.pushback: float | None = None
        self.pushed_back: list[float] = []
        self._pushes = asyncio.Condition()
        self.pushback_in_status = True
        self._enrolled = 0
        self.enroll_attempts = 0

    async def pushbacks(self, count: int) -> None:
        """Until `count` streams in all were refused by admission control (10 s at most)."""
        async with asyncio.timeout(10), self._pushes:
            await self._pushes.wait_for(lambda: len(self.pushed_back) >= count)

    async def session(self) -> Session:
        async with asyncio.timeout(10):
            return await self.sessions.get()

    async def Enroll(
        self,
        request: agents_pb2.EnrollRequest,
        context: _Context,
    ) -> agents_pb2.EnrollResponse:
        self.enroll_attempts += 1
        if request.join_token not in self.join_tokens:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "join token is not valid")
        self.join_tokens.discard(request.join_token)
        self._enrolled += 1
        credential = f"cred-{self._enrolled}"
        self.credentials.add(credential)
        await self.enrollments.put(request)
        return agents_pb2.EnrollResponse(
            agent=request.name,
            credential=credential,
            signing_keys=[agents_pb2.SigningKey(key_id=KEY_ID, public_key=PUBLIC_KEY)],
        )

    async def RenewCertificate(
        self, request: agents_pb2.RenewCertificateRequest, context: _Context
    ) -> agents_pb2.RenewCertificateResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def Connect(
        self, request_iterator: AsyncIterator[AgentMessage], context: _Context
    ) -> AsyncIterator[CoordinatorMessage]:
        metadata = dict(context.invocation_metadata() or ())
        authorization = str(metadata.get("authorization", ""))
        if self.pushback is not None:
            self.pushed_back.append(time.monotonic())
            async with self._pushes:
                self._pushes.notify_all()
            seconds = int(self.pushback)
            hint = agentlink_pb2.RetryHint(
                retry_after=Duration(seconds=seconds, nanos=int((self.pushback - seconds) * 1e9)),
                reason="too many agents connecting",
            )
            yield CoordinatorMessage(pushback=hint)
            # The hint in the status details as well, as the real coordinator sends it; without
            # `in_status_too`, only in-stream.
            trailing = retry_metadata(hint) if self.pushback_in_status else ()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too many agents connecting",
                trailing_metadata=trailing,
            )
        if self.refuse is not None:
            await self.refused.put(authorization)
            await context.abort(self.refuse, self.refuse_details)
        if authorization not in {f"Bearer {c}" for c in self.credentials}:
            await self.refused.put(authorization)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "credential is not valid")
        first = await anext(request_iterator)
        session = Session(authorization, first.hello)
        pump = asyncio.ensure_future(self._pump(request_iterator, session))
        try:
            await self.sessions.put(session)
            if self.silent:
                await session.outgoing.get()
                return
            welcome = agentlink_pb2.Welcome(
                version=jitmesh.__version__,
                epoch=self.epoch,
                resume_after_seq=first.hello.last_applied_seq,
                agent=first.hello.agent,
            )
            if self.heartbeat_interval is not None:
                welcome.heartbeat_interval.CopyFrom(self.heartbeat_interval)
            if self.welcome_extra is not None:
                welcome.MergeFrom(self.welcome_extra)
            yield CoordinatorMessage(welcome=welcome)
            while True:
                item = await session.outgoing.get()
                if item is None:
                    return
                if isinstance(item, grpc.StatusCode):
                    await context.abort(item, "ended by the test")
                yield item
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                await pump
            session.ended.set()

    async def _pump(self, requests: AsyncIterator[AgentMessage], session: Session) -> None:
        async for message in requests:
            kind = message.WhichOneof("body")
            if kind == "ack":
                await session.acks.put(message.ack)
            elif kind == "event":
                await session.events.put(message.event)
                if self.ack_events:
                    session.send(
                        CoordinatorMessage(
                            event_ack=agentlink_pb2.EventAck(event_ids=[message.event.event_id])
                        )
                    )
            elif kind == "heartbeat":
                await session.heartbeats.put(message.heartbeat)

    # Not used by the agent.

    async def ListAgents(
        self,
        request: agents_pb2.ListAgentsRequest,
        context: _Context,
    ) -> agents_pb2.ListAgentsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")

    async def GetAgent(
        self,
        request: agents_pb2.GetAgentRequest,
        context: _Context,
    ) -> types_pb2.Agent:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")

    async def CreateJoinToken(
        self,
        request: agents_pb2.CreateJoinTokenRequest,
        context: _Context,
    ) -> agents_pb2.CreateJoinTokenResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")

    async def RemoveAgent(
        self,
        request: agents_pb2.RemoveAgentRequest,
        context: _Context,
    ) -> agents_pb2.RemoveAgentResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")

    async def ListJoinTokens(
        self, request: agents_pb2.ListJoinTokensRequest, context: _Context
    ) -> agents_pb2.ListJoinTokensResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")

    async def RevokeJoinToken(
        self, request: agents_pb2.RevokeJoinTokenRequest, context: _Context
    ) -> agents_pb2.JoinTokenInfo:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this fake")


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[Coordinator]:
    fake = Coordinator()
    server = grpc.aio.server()
    add_AgentLinkServicer_to_server(fake, server)
    add_AgentsServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fake.address = f"127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await server.stop(None)


# Commands.


def command(body: agentlink_pb2.CommandBody) -> CoordinatorMessage:
    data = body.SerializeToString()
    return CoordinatorMessage(
        command=agentlink_pb2.Command(
            seq=body.seq, body=data, key_id=KEY_ID, signature=SIGNING_KEY.sign(data)
        )
    )


def grant_body(
    seq: int,
    grant_id: str,
    not_before: datetime,
    not_after: datetime,
    *,
    subject: str = "alice",
    action: str = "deploy",
    agent: str = "web-1",
    epoch: int = 7,
) -> agentlink_pb2.CommandBody:
    return agentlink_pb2.CommandBody(
        agent=agent,
        epoch=epoch,
        seq=seq,
        grant=grant_message(grant_id, not_before, not_after, subject=subject, action=action),
    )


def grant_message(
    grant_id: str,
    not_before: datetime,
    not_after: datetime,
    *,
    subject: str = "alice",
    action: str = "deploy",
) -> agentlink_pb2.GrantCommand:
    return agentlink_pb2.GrantCommand(
        grant_id=grant_id,
        subject=subject,
        action=action,
        not_before=ts(not_before),
        not_after=ts(not_after),
        offline=types_pb2.OfflinePolicy(mode=types_pb2.OFFLINE_MODE_HOLD),
    )


def revoke_body(
    seq: int, grant_id: str, *, agent: str = "web-1", epoch: int = 7
) -> agentlink_pb2.CommandBody:
    return agentlink_pb2.CommandBody(
        agent=agent,
        epoch=epoch,
        seq=seq,
        revoke=agentlink_pb2.RevokeCommand(
            grant_id=grant_id, reason=agentlink_pb2.REVOKE_REASON_REVOKED
        ),
    )


def snapshot_body(
    seq: int,
    grants: list[agentlink_pb2.GrantCommand],
    tombstones: list[str] | None = None,
    *,
    agent: str = "web-1",
    epoch: int = 7,
) -> agentlink_pb2.CommandBody:
    return agentlink_pb2.CommandBody(
        agent=agent,
        epoch=epoch,
        seq=seq,
        snapshot=agentlink_pb2.SnapshotCommand(grants=grants, tombstones=tombstones or []),
    )
