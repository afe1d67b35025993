"""A scripted stand-in for the coordinator's public gRPC services, for SDK and CLI tests.

Real `grpc.aio` servers on 127.0.0.1 port 0 running the generated servicer interfaces over a
small in-memory model. Tests set the model up, script failures (`fail`) and stream contents, and
read back what the server saw (`calls`, `authorizations`).

`serve()` runs the server in the current event loop (SDK tests); `ServerThread` runs it in a
thread with its own loop, for code that calls `asyncio.run` itself (the CLI).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import Message
from grpc import aio

from jitmesh import convert as _convert
from jitmesh.types import (
    Agent,
    AuditEvent,
    ChainVerification,
    Grant,
    GrantState,
    OfflineMode,
    OfflinePolicy,
    PolicyDecision,
    PolicyDocument,
    Request,
    RequestState,
    Review,
    ReviewDecision,
)
from jitmesh.v1 import (
    access_pb2,
    access_pb2_grpc,
    agents_pb2,
    agents_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    types_pb2,
)

Ctx = aio.ServicerContext[Any, Any]
T = TypeVar("T")

TOKEN = "tok-0123456789abcdef"
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
# Small on purpose: every list of three or more items takes several pages.
PAGE_CAP = 2


def rid(n: int) -> str:
    return f"req-{n:032x}"


def gid(n: int) -> str:
    return f"grt-{n:032x}"


def make_request(n: int = 1, **changes: Any) -> Request:
    request = Request(
        id=rid(n),
        subject="alice",
        agent="web-1",
        action="deploy",
        duration=timedelta(minutes=15),
        reason="release 42",
        state=RequestState.PENDING,
        rule="deployers",
        approvals_required=1,
        approver_groups=("sre",),
        reviews=(),
        created_at=NOW,
        pending_expires_at=NOW + timedelta(hours=1),
        decided_at=None,
        decided_by="",
        decision_reason="",
        grant_id="",
        grant_state=None,
    )
    return replace(request, **changes)


def make_grant(n: int = 1, **changes: Any) -> Grant:
    grant = Grant(
        id=gid(n),
        request_id=rid(n),
        agent="web-1",
        subject="alice",
        action="deploy",
        not_before=NOW,
        not_after=NOW + timedelta(minutes=15),
        state=GrantState.ACTIVE,
        offline=OfflinePolicy(OfflineMode.REVOKE_AFTER, timedelta(minutes=5)),
        created_at=NOW,
        applied_at=NOW + timedelta(milliseconds=250),
        grant_seq=7,
        epoch=1,
    )
    return replace(grant, **changes)


def approved(request: Request, grant: Grant, *, by: str = "bob") -> Request:
    return replace(
        request,
        state=RequestState.APPROVED,
        reviews=(Review(by, ReviewDecision.APPROVE, "ok", NOW),),
        decided_at=NOW,
        decided_by=by,
        grant_id=grant.id,
        grant_state=grant.state,
    )


def make_agent(name: str = "web-1", **changes: Any) -> Agent:
    agent = Agent(
        name=name,
        labels={"env": "prod", "role": "web"},
        connected=True,
        last_seen_at=NOW,
        enrolled_at=NOW - timedelta(days=3),
        version="0.1.0",
        last_acked_seq=7,
        last_seq=7,
        active_grants=1,
    )
    return replace(agent, **changes)


def make_event(seq: int, **changes: Any) -> AuditEvent:
    event = AuditEvent(
        seq=seq,
        id=f"evt-{seq:032x}",
        at=NOW + timedelta(seconds=seq),
        actor="alice",
        kind="request.created",
        subject="alice",
        agent="web-1",
        request_id=rid(seq),
        grant_id="",
        details={"reason": "release 42"},
        prev_hash=f"{seq - 1:064x}",
        hash=f"{seq:064x}",
    )
    return replace(event, **changes)


@dataclass
class Scripted:
    """The model behind the scripted services, and the script."""

    token: str | None = TOKEN
    requests: dict[str, Request] = field(default_factory=dict)
    grants: dict[str, Grant] = field(default_factory=dict)
    agents: dict[str, Agent] = field(default_factory=dict)
    events: list[AuditEvent] = field(default_factory=list)
    policy: PolicyDocument = field(
        default_factory=lambda: PolicyDocument(
            yaml="rules:\n  - name: deployers\n",
            version=3,
            sha256="ab" * 32,
            applied_at=NOW,
            applied_by="admin",
        )
    )
    decision: PolicyDecision = field(
        default_factory=lambda: PolicyDecision(
            allowed=True,
            rule="deployers",
            explanation="rule deployers matched: alice is in group dev",
            approval_required=True,
            approvals_required=1,
            approver_groups=("sre",),
            max_duration=timedelta(hours=1),
            reason_required=True,
            trace=("deployers: matched", "admins: subject not in group admins"),
        )
    )
    verification: ChainVerification = field(
        default_factory=lambda: ChainVerification(True, 3, 0, "", "cd" * 32)
    )
    # Method name -> the status every call to it is aborted with.
    failures: dict[str, tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...], int | None]] = (
        field(default_factory=dict)
    )
    # Methods that never answer; `abandoned` is set when the server sees such a call cancelled.
    hang: set[str] = field(default_factory=set)
    abandoned: asyncio.Event | None = None
    # CreateRequest approves at once (policy without approval) when set.
    auto_approve: bool = False
    # Snapshots WatchRequests sends after the current one, in order, one per subscription step.
    watch_script: list[Request] = field(default_factory=list)
    # When set, WatchRequests waits for the next of these (set by the test, in its own thread)
    # before each scripted snapshot: the client is seen between two steps.
    watch_gates: list[threading.Event] = field(default_factory=list)
    # Statuses with which the first WatchRequests subscriptions end (after their first snapshot).
    watch_breaks: list[grpc.StatusCode] = field(default_factory=list)
    # TailEvents ends the first subscription with UNAVAILABLE after this many events.
    tail_break_after: int | None = None
    calls: list[tuple[str, Message]] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    subscribed: asyncio.Event | None = None
    _counter: int = 100
    _published: asyncio.Condition | None = None

    def put(self, *items: Request | Grant | Agent | AuditEvent) -> None:
        for item in items:
            if isinstance(item, Request):
                self.requests[item.id] = item
            elif isinstance(item, Grant):
                self.grants[item.id] = item
            elif isinstance(item, Agent):
                self.agents[item.name] = item
            else:
                self.events.append(item)

    def fail(
        self,
        method: str,
        code: grpc.StatusCode,
        details: str,
        *,
        trailing: tuple[tuple[str, bytes], ...] = (),
        times: int | None = None,
    ) -> None:
        """Answer `method` with this status (and trailing metadata), for ever or `times`."""
        self.failures[method] = (code, details, trailing, times)

    def calls_to(self, method: str) -> list[Message]:
        return [message for name, message in self.calls if name == method]

    async def publish(self, event: AuditEvent) -> None:
        """Append an event and wake the tails (runs in the server's loop)."""
        self.events.append(event)
        async with self._condition():
            self._condition().notify_all()

    def _condition(self) -> asyncio.Condition:
        if self._published is None:
            self._published = asyncio.Condition()
        return self._published

    def next_id(self) -> int:
        self._counter += 1
        return self._counter

    async def guard(self, method: str, request: Message, context: Ctx) -> None:
        """Record the call, check the bearer token, apply a scripted failure."""
        self.calls.append((method, request))
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        self.authorizations.append(None if authorization is None else str(authorization))
        if self.token is not None and authorization != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
        if method in self.failures:
            code, details, trailing, times = self.failures[method]
            if times is not None:
                if times <= 1:
                    del self.failures[method]
                else:
                    self.failures[method] = (code, details, trailing, times - 1)
            await context.abort(code, details, trailing_metadata=trailing)
        if method in self.hang:
            try:
                await asyncio.Event().wait()
            finally:
                if self.abandoned is not None:
                    self.abandoned.set()


def _page(items: list[T], size: int, token: str) -> tuple[list[T], str]:
    start = int(token or 0)
    size = min(size or PAGE_CAP, PAGE_CAP)
    end = start + size
    return items[start:end], (str(end) if end < len(items) else "")


async def _missing(context: Ctx, what: str) -> NoReturn:
    await context.abort(grpc.StatusCode.NOT_FOUND, f"no such {what}")


class AccessService(access_pb2_grpc.AccessServicer):
    async def ExtendGrant(
        self, request: access_pb2.ExtendGrantRequest, context: Ctx
    ) -> access_pb2.ExtendGrantResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def ListRequestOptions(
        self, request: access_pb2.ListRequestOptionsRequest, context: Ctx
    ) -> access_pb2.ListRequestOptionsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    def __init__(self, model: Scripted) -> None:
        self.m = model

    async def CreateRequest(
        self, request: access_pb2.CreateRequestRequest, context: Ctx
    ) -> access_pb2.CreateRequestResponse:
        await self.m.guard("CreateRequest", request, context)
        n = self.m.next_id()
        created = make_request(
            n,
            agent=request.agent,
            action=request.action,
            duration=request.duration.ToTimedelta(),
            reason=request.reason,
        )
        grant = None
        if self.m.auto_approve:
            grant = make_grant(n, state=GrantState.PENDING_DELIVERY, applied_at=None)
            created = approved(created, grant, by="policy")
            self.m.put(grant)
        self.m.put(created)
        return access_pb2.CreateRequestResponse(
            request=_convert.request_to_proto(created),
            grant=None if grant is None else _convert.grant_to_proto(grant),
        )

    async def GetRequest(
        self, request: access_pb2.GetRequestRequest, context: Ctx
    ) -> types_pb2.AccessRequest:
        await self.m.guard("GetRequest", request, context)
        if request.id not in self.m.requests:
            await _missing(context, "request")
        return _convert.request_to_proto(self.m.requests[request.id])

    async def ListRequests(
        self, request: access_pb2.ListRequestsRequest, context: Ctx
    ) -> access_pb2.ListRequestsResponse:
        await self.m.guard("ListRequests", request, context)
        states = {_convert.request_state(s) for s in request.states}
        matching = [
            r
            for r in self.m.requests.values()
            if (not states or r.state in states)
            and request.subject in ("", r.subject)
            and request.agent in ("", r.agent)
        ]
        page, token = _page(matching, request.page_size, request.page_token)
        return access_pb2.ListRequestsResponse(
            requests=[_convert.request_to_proto(r) for r in page], next_page_token=token
        )

    async def ReviewRequest(
        self, request: access_pb2.ReviewRequestRequest, context: Ctx
    ) -> access_pb2.ReviewRequestResponse:
        await self.m.guard("ReviewRequest", request, context)
        current = self.m.requests.get(request.id)
        if current is None:
            await _missing(context, "request")
        if current.state is not RequestState.PENDING:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "request is not pending")
        grant = None
        if request.decision == types_pb2.REVIEW_DECISION_APPROVE:
            grant = make_grant(self.m.next_id(), request_id=current.id, state=GrantState.ACTIVE)
            updated = approved(current, grant)
            self.m.put(grant)
        else:
            updated = replace(
                current,
                state=RequestState.DENIED,
                decided_at=NOW,
                decided_by="bob",
                decision_reason=request.reason,
            )
        self.m.put(updated)
        return access_pb2.ReviewRequestResponse(
            request=_convert.request_to_proto(updated),
            grant=None if grant is None else _convert.grant_to_proto(grant),
        )

    async def CancelRequest(
        self, request: access_pb2.CancelRequestRequest, context: Ctx
    ) -> types_pb2.AccessRequest:
        await self.m.guard("CancelRequest", request, context)
        current = self.m.requests.get(request.id)
        if current is None:
            await _missing(context, "request")
        updated = replace(current, state=RequestState.CANCELLED, decided_by="alice")
        self.m.put(updated)
        return _convert.request_to_proto(updated)

    async def WatchRequests(
        self, request: access_pb2.WatchRequestsRequest, context: Ctx
    ) -> AsyncIterator[types_pb2.AccessRequest]:
        await self.m.guard("WatchRequests", request, context)
        # The contract the SDK relies on: the current snapshot of each watched request first.
        for request_id in request.ids:
            if request_id in self.m.requests:
                yield _convert.request_to_proto(self.m.requests[request_id])
        if self.m.subscribed is not None:
            self.m.subscribed.set()
        if self.m.watch_breaks:
            await context.abort(self.m.watch_breaks.pop(0), "stream recycled")
        while self.m.watch_script:
            if self.m.watch_gates:
                gate = self.m.watch_gates.pop(0)
                await asyncio.to_thread(gate.wait, 60)
            snapshot = self.m.watch_script.pop(0)
            self.m.put(snapshot)
            yield _convert.request_to_proto(snapshot)
        # Then stay open, as the coordinator does, until the client goes away.
        await asyncio.Event().wait()

    async def GetGrant(self, request: access_pb2.GetGrantRequest, context: Ctx) -> types_pb2.Grant:
        await self.m.guard("GetGrant", request, context)
        if request.id not in self.m.grants:
            await _missing(context, "grant")
        return _convert.grant_to_proto(self.m.grants[request.id])

    async def ListGrants(
        self, request: access_pb2.ListGrantsRequest, context: Ctx
    ) -> access_pb2.ListGrantsResponse:
        await self.m.guard("ListGrants", request, context)
        states = {_convert.grant_state(s) for s in request.states}
        matching = [
            g
            for g in self.m.grants.values()
            if (not states or g.state in states)
            and request.subject in ("", g.subject)
            and request.agent in ("", g.agent)
        ]
        page, token = _page(matching, request.page_size, request.page_token)
        return access_pb2.ListGrantsResponse(
            grants=[_convert.grant_to_proto(g) for g in page], next_page_token=token
        )

    async def RevokeGrant(
        self, request: access_pb2.RevokeGrantRequest, context: Ctx
    ) -> types_pb2.Grant:
        await self.m.guard("RevokeGrant", request, context)
        return await self._end(request.id, GrantState.REVOKING, request.reason, context)

    async def ReleaseGrant(
        self, request: access_pb2.ReleaseGrantRequest, context: Ctx
    ) -> types_pb2.Grant:
        await self.m.guard("ReleaseGrant", request, context)
        return await self._end(request.id, GrantState.RELEASED, "released", context)

    async def _end(
        self, grant_id: str, state: GrantState, reason: str, context: Ctx
    ) -> types_pb2.Grant:
        current = self.m.grants.get(grant_id)
        if current is None:
            await _missing(context, "grant")
        updated = replace(current, state=state, ended_at=NOW, ended_by="bob", end_reason=reason)
        self.m.put(updated)
        return _convert.grant_to_proto(updated)


class AgentsService(agents_pb2_grpc.AgentsServicer):
    def __init__(self, model: Scripted) -> None:
        self.m = model

    async def ListAgents(
        self, request: agents_pb2.ListAgentsRequest, context: Ctx
    ) -> agents_pb2.ListAgentsResponse:
        await self.m.guard("ListAgents", request, context)
        page, token = _page(list(self.m.agents.values()), request.page_size, request.page_token)
        return agents_pb2.ListAgentsResponse(
            agents=[_convert.agent_to_proto(a) for a in page], next_page_token=token
        )

    async def GetAgent(self, request: agents_pb2.GetAgentRequest, context: Ctx) -> types_pb2.Agent:
        await self.m.guard("GetAgent", request, context)
        if request.name not in self.m.agents:
            await _missing(context, "agent")
        return _convert.agent_to_proto(self.m.agents[request.name])

    async def CreateJoinToken(
        self, request: agents_pb2.CreateJoinTokenRequest, context: Ctx
    ) -> agents_pb2.CreateJoinTokenResponse:
        await self.m.guard("CreateJoinToken", request, context)
        ttl = request.ttl.ToTimedelta() if request.HasField("ttl") else timedelta(hours=1)
        return agents_pb2.CreateJoinTokenResponse(
            token="join-secret-0123456789", expires_at=_convert.time_to_proto(NOW + ttl)
        )

    async def RemoveAgent(
        self, request: agents_pb2.RemoveAgentRequest, context: Ctx
    ) -> agents_pb2.RemoveAgentResponse:
        await self.m.guard("RemoveAgent", request, context)
        if self.m.agents.pop(request.name, None) is None:
            await _missing(context, "agent")
        return agents_pb2.RemoveAgentResponse()

    async def Enroll(
        self, request: agents_pb2.EnrollRequest, context: Ctx
    ) -> agents_pb2.EnrollResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def RenewCertificate(
        self, request: agents_pb2.RenewCertificateRequest, context: Ctx
    ) -> agents_pb2.RenewCertificateResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def ListJoinTokens(
        self, request: agents_pb2.ListJoinTokensRequest, context: Ctx
    ) -> agents_pb2.ListJoinTokensResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def RevokeJoinToken(
        self, request: agents_pb2.RevokeJoinTokenRequest, context: Ctx
    ) -> agents_pb2.JoinTokenInfo:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")


class PolicyService(policy_pb2_grpc.PolicyServicer):
    def __init__(self, model: Scripted) -> None:
        self.m = model

    async def GetPolicy(
        self, request: policy_pb2.GetPolicyRequest, context: Ctx
    ) -> policy_pb2.PolicyDocument:
        await self.m.guard("GetPolicy", request, context)
        return _convert.policy_document_to_proto(self.m.policy)

    async def ApplyPolicy(
        self, request: policy_pb2.ApplyPolicyRequest, context: Ctx
    ) -> policy_pb2.PolicyDocument:
        await self.m.guard("ApplyPolicy", request, context)
        if request.expected_version and request.expected_version != self.m.policy.version:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"policy is at version {self.m.policy.version}, not {request.expected_version}",
            )
        self.m.policy = PolicyDocument(
            yaml=request.yaml,
            version=self.m.policy.version + 1,
            sha256=hashlib.sha256(request.yaml.encode()).hexdigest(),
            applied_at=NOW,
            applied_by="admin",
        )
        return _convert.policy_document_to_proto(self.m.policy)

    async def TestPolicy(
        self, request: policy_pb2.TestPolicyRequest, context: Ctx
    ) -> policy_pb2.TestPolicyResponse:
        await self.m.guard("TestPolicy", request, context)
        return _convert.policy_decision_to_proto(self.m.decision)


class AuditService(audit_pb2_grpc.AuditServicer):
    def __init__(self, model: Scripted) -> None:
        self.m = model
        self.tails = 0

    async def ListEvents(
        self, request: audit_pb2.ListEventsRequest, context: Ctx
    ) -> audit_pb2.ListEventsResponse:
        await self.m.guard("ListEvents", request, context)
        since = _convert.time_or_none(request.since)
        matching = [
            e
            for e in self.m.events
            if e.seq > request.after_seq
            and (since is None or e.at >= since)
            and request.agent in ("", e.agent)
            and request.subject in ("", e.subject)
            and request.kind in ("", e.kind)
            and request.grant_id in ("", e.grant_id)
            and request.request_id in ("", e.request_id)
        ]
        page, token = _page(matching, request.page_size, request.page_token)
        return audit_pb2.ListEventsResponse(
            events=[_convert.audit_event_to_proto(e) for e in page], next_page_token=token
        )

    async def TailEvents(
        self, request: audit_pb2.TailEventsRequest, context: Ctx
    ) -> AsyncIterator[types_pb2.AuditEvent]:
        await self.m.guard("TailEvents", request, context)
        self.tails += 1
        first = self.tails == 1
        after = request.after_seq
        sent = 0
        condition = self.m._condition()
        while True:
            for event in [e for e in self.m.events if e.seq > after]:
                limit = self.m.tail_break_after
                if first and limit is not None and sent >= limit:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "stream recycled")
                yield _convert.audit_event_to_proto(event)
                after = event.seq
                sent += 1
            async with condition:
                await condition.wait_for(functools.partial(self._newer_than, after))

    def _newer_than(self, seq: int) -> bool:
        return any(e.seq > seq for e in self.m.events)

    async def VerifyChain(
        self, request: audit_pb2.VerifyChainRequest, context: Ctx
    ) -> audit_pb2.VerifyChainResponse:
        await self.m.guard("VerifyChain", request, context)
        return _convert.chain_verification_to_proto(self.m.verification)

    async def ListCheckpoints(
        self, request: audit_pb2.ListCheckpointsRequest, context: Ctx
    ) -> audit_pb2.ListCheckpointsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")


async def start(model: Scripted) -> tuple[aio.Server, str]:
    server = aio.server()
    access_pb2_grpc.add_AccessServicer_to_server(AccessService(model), server)
    agents_pb2_grpc.add_AgentsServicer_to_server(AgentsService(model), server)
    policy_pb2_grpc.add_PolicyServicer_to_server(PolicyService(model), server)
    audit_pb2_grpc.add_AuditServicer_to_server(AuditService(model), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@asynccontextmanager
async def serve(model: Scripted) -> AsyncIterator[str]:
    """Run the scripted services in the current event loop; yields the target address."""
    server, target = await start(model)
    try:
        yield target
    finally:
        await server.stop(None)


class ServerThread:
    """The scripted services in a thread with its own event loop (for `asyncio.run` callers)."""

    def __init__(self, model: Scripted) -> None:
        self.model = model
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: aio.Server | None = None
        self.target = ""

    def run(self, make: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run a coroutine made by `make` in the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(timeout)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._server, self.target = self.run(lambda: start(self.model))
        return self

    def __exit__(self, *exc_info: object) -> None:
        server = self._server
        if server is not None:
            self.run(lambda: server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@contextmanager
def server_thread(model: Scripted) -> Iterator[ServerThread]:
    with ServerThread(model) as running:
        yield running
