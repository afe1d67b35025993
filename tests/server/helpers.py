"""Shared builders for the coordinator tests."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

import jitmesh
from jitmesh import types
from jitmesh.client import Client
from jitmesh.clock import FakeClock
from jitmesh.types import Grant, GrantState, OfflinePolicy, Request, RequestState
from jitmesh.v1 import agentlink_pb2, agentlink_pb2_grpc
from server.app import Coordinator
from server.domain.models import ADMIN_GROUP, Principal, new_id

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ADMIN = Principal("admin", frozenset({ADMIN_GROUP}))
USERS: dict[str, list[str]] = {
    "alice": ["developers"],
    "bob": ["sre"],
    "carol": ["sre"],
    "dave": ["developers"],
    "admin": [ADMIN_GROUP],
}
TOKENS = {name: f"jmt_test_{name}_0123456789abcdef" for name in USERS}
WAIT = 10.0  # seconds any single wait in these tests may take before it counts as a hang


@dataclass
class Env:
    coordinator: Coordinator
    clock: FakeClock
    clients: dict[str, Client]
    credentials: dict[str, str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.coordinator.port}"

    @property
    def alice(self) -> Client:
        return self.clients["alice"]

    @property
    def bob(self) -> Client:
        return self.clients["bob"]

    @property
    def carol(self) -> Client:
        return self.clients["carol"]

    @property
    def dave(self) -> Client:
        return self.clients["dave"]

    @property
    def admin(self) -> Client:
        return self.clients["admin"]

    async def wait_grant_state(
        self, request_id: str, state: GrantState, *, client: Client | None = None
    ) -> types.Request:
        """Wait (on the request watch, no polling) until the request's grant is in `state`."""
        watcher = client or self.admin
        return await watcher.wait_for_request(
            request_id,
            until=lambda r: (
                r.grant_state is state or bool(r.grant_state and r.grant_state.terminal)
            ),
            timeout=WAIT,
        )


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@asynccontextmanager
async def channel(address: str) -> AsyncIterator[aio.Channel]:
    opened = aio.insecure_channel(address)
    try:
        yield opened
    finally:
        await opened.close(None)


Link = aio.StreamStreamCall[agentlink_pb2.AgentMessage, agentlink_pb2.CoordinatorMessage]


class AgentLink:
    """A raw AgentLink stream, driven message by message as an agent would."""

    def __init__(self, call: Link) -> None:
        self.call = call

    async def send(self, message: agentlink_pb2.AgentMessage) -> None:
        await self.call.write(message)

    async def hello(self, agent: str, last_applied_seq: int = 0) -> agentlink_pb2.Welcome:
        await self.send(
            agentlink_pb2.AgentMessage(
                hello=agentlink_pb2.Hello(
                    agent=agent,
                    last_applied_seq=last_applied_seq,
                    version=jitmesh.__version__,
                    boot_id="b1",
                )
            )
        )
        return (await self.next("welcome")).welcome

    async def ack(
        self,
        seq: int,
        grant_id: str,
        status: agentlink_pb2.AckStatus.ValueType = agentlink_pb2.ACK_STATUS_APPLIED,
    ) -> None:
        await self.send(
            agentlink_pb2.AgentMessage(
                ack=agentlink_pb2.Ack(seq=seq, status=status, grant_id=grant_id)
            )
        )

    async def next(self, kind: str) -> agentlink_pb2.CoordinatorMessage:
        """The next message of `kind`, skipping heartbeats; fails if the stream ends first."""
        async with asyncio.timeout(WAIT):
            while True:
                message = await self.call.read()
                if message is aio.EOF:  # type: ignore[attr-defined]
                    raise AssertionError(f"stream ended while waiting for {kind}")
                assert isinstance(message, agentlink_pb2.CoordinatorMessage)
                found = message.WhichOneof("body")
                if found == kind:
                    return message
                assert found == "heartbeat", f"expected {kind}, got {found}"

    async def command(self) -> tuple[int, agentlink_pb2.CommandBody]:
        message = await self.next("command")
        body = agentlink_pb2.CommandBody.FromString(message.command.body)
        return message.command.seq, body

    async def ended(self) -> grpc.StatusCode:
        """Wait for the coordinator to end the stream; its status code."""
        async with asyncio.timeout(WAIT):
            while True:
                try:
                    message = await self.call.read()
                except aio.AioRpcError as exc:
                    return exc.code()
                if message is aio.EOF:  # type: ignore[attr-defined]
                    return await self.call.code()


@asynccontextmanager
async def agent_link(address: str, credential: str) -> AsyncIterator[AgentLink]:
    async with channel(address) as ch:
        call = agentlink_pb2_grpc.AgentLinkStub(ch).Connect(None, metadata=bearer(credential))
        try:
            yield AgentLink(call)
        finally:
            call.cancel()


def make_request(
    *,
    created_at: datetime = T0,
    subject: str = "alice",
    agent: str = "web-1",
    state: RequestState = RequestState.PENDING,
    request_id: str | None = None,
) -> Request:
    return Request(
        id=request_id or new_id("req"),
        subject=subject,
        agent=agent,
        action="deploy",
        duration=timedelta(minutes=15),
        reason="",
        state=state,
        rule="r",
        approvals_required=1,
        approver_groups=("sre",),
        reviews=(),
        created_at=created_at,
        pending_expires_at=created_at + timedelta(hours=1),
        decided_at=None,
        decided_by="",
        decision_reason="",
        grant_id="",
        grant_state=None,
    )


def make_grant(
    *,
    request_id: str,
    agent: str = "web-1",
    at: datetime = T0,
    state: GrantState = GrantState.PENDING_DELIVERY,
    duration: timedelta = timedelta(minutes=15),
) -> Grant:
    return Grant(
        id=new_id("grt"),
        request_id=request_id,
        agent=agent,
        subject="alice",
        action="deploy",
        not_before=at,
        not_after=at + duration,
        state=state,
        offline=OfflinePolicy(),
        created_at=at,
    )


def raw_sql(path: Path, sql: str) -> list[Any]:
    """Run one statement on the database file directly (behind the store's back) and commit."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute(sql).fetchall()
        db.commit()
        return rows
    finally:
        db.close()
