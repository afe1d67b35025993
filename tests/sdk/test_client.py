"""The SDK against scripted coordinator services: values in and out, metadata, paging."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from datetime import timedelta

import grpc
import pytest

from jitmesh import errors
from jitmesh.client import Client
from jitmesh.types import Grant, GrantState, Request, RequestState
from jitmesh.v1 import access_pb2, agents_pb2, audit_pb2, policy_pb2
from tests.sdk.scripted import (
    NOW,
    TOKEN,
    Scripted,
    gid,
    make_agent,
    make_event,
    make_grant,
    make_request,
    rid,
    serve,
)


async def test_every_call_carries_the_bearer_token(model: Scripted, client: Client) -> None:
    model.put(make_request(1), make_grant(1), make_agent())
    await client.get_request(rid(1))
    await client.list_grants()
    await client.get_agent("web-1")
    await client.get_policy()
    await client.verify_audit()
    async with aclosing(client.watch_requests([rid(1)])) as stream:
        await anext(stream)
    assert len(model.authorizations) == 6
    assert set(model.authorizations) == {f"Bearer {TOKEN}"}


async def test_no_token_sends_no_authorization(model: Scripted, target: str) -> None:
    model.token = None
    async with await Client.connect(target, token="") as client:
        await client.get_policy()
    assert model.authorizations == [None]


async def test_repr_never_shows_the_token(client: Client) -> None:
    assert TOKEN not in repr(client)
    assert client.target in repr(client)


async def test_create_request_pending_has_no_grant(model: Scripted, client: Client) -> None:
    request, grant = await client.create_request(
        agent="web-1", action="deploy", duration=timedelta(minutes=15), reason="release 42"
    )
    assert isinstance(request, Request)
    assert request.state is RequestState.PENDING
    assert grant is None
    (sent,) = model.calls_to("CreateRequest")
    assert isinstance(sent, access_pb2.CreateRequestRequest)
    assert (sent.agent, sent.action, sent.reason) == ("web-1", "deploy", "release 42")
    assert sent.duration.seconds == 900


async def test_create_request_approved_at_once_returns_the_grant(
    model: Scripted, client: Client
) -> None:
    model.auto_approve = True
    request, grant = await client.create_request(
        agent="web-1", action="deploy", duration=timedelta(minutes=5)
    )
    assert request.state is RequestState.APPROVED
    assert isinstance(grant, Grant)
    assert grant.id == request.grant_id
    assert grant.state is GrantState.PENDING_DELIVERY
    assert grant.not_after.tzinfo is not None


async def test_list_requests_follows_pages(model: Scripted, client: Client) -> None:
    model.put(*(make_request(n) for n in range(1, 6)))
    requests = await client.list_requests()
    assert [r.id for r in requests] == [rid(n) for n in range(1, 6)]
    calls = model.calls_to("ListRequests")
    tokens = [m.page_token for m in calls if isinstance(m, access_pb2.ListRequestsRequest)]
    assert tokens == ["", "2", "4"]


async def test_list_requests_stops_at_limit(model: Scripted, client: Client) -> None:
    model.put(*(make_request(n) for n in range(1, 6)))
    requests = await client.list_requests(limit=3)
    assert [r.id for r in requests] == [rid(1), rid(2), rid(3)]
    assert len(model.calls_to("ListRequests")) == 2


async def test_list_requests_sends_filters(model: Scripted, client: Client) -> None:
    model.put(
        make_request(1),
        make_request(2, state=RequestState.DENIED),
        make_request(3, agent="db-1"),
    )
    requests = await client.list_requests(
        states=[RequestState.PENDING], agent="web-1", subject="alice"
    )
    assert [r.id for r in requests] == [rid(1)]


async def test_review_cancel(model: Scripted, client: Client) -> None:
    model.put(make_request(1), make_request(2), make_request(3))
    request, grant = await client.approve(rid(1), reason="ok")
    assert request.state is RequestState.APPROVED
    assert grant is not None
    assert grant.request_id == rid(1)
    denied = await client.deny(rid(2), reason="not during the freeze")
    assert denied.state is RequestState.DENIED
    assert denied.decision_reason == "not during the freeze"
    cancelled = await client.cancel(rid(3))
    assert cancelled.state is RequestState.CANCELLED
    with pytest.raises(errors.ConflictError, match="not pending"):
        await client.approve(rid(2))


async def test_grants(model: Scripted, client: Client) -> None:
    model.put(
        make_grant(1),
        make_grant(2),
        make_grant(3, state=GrantState.EXPIRED),
    )
    live = await client.list_grants(states=[GrantState.ACTIVE])
    assert [g.id for g in live] == [gid(1), gid(2)]
    assert (await client.get_grant(gid(3))).state is GrantState.EXPIRED
    revoked = await client.revoke_grant(gid(1), reason="incident")
    assert revoked.state is GrantState.REVOKING
    assert revoked.end_reason == "incident"
    released = await client.release_grant(gid(2))
    assert released.state is GrantState.RELEASED
    with pytest.raises(errors.NotFoundError, match="no such grant"):
        await client.get_grant(gid(9))


async def test_agents_and_join_tokens(model: Scripted, client: Client) -> None:
    model.put(make_agent("web-1"), make_agent("web-2", connected=False), make_agent("db-1"))
    agents = await client.list_agents()
    assert [a.name for a in agents] == ["web-1", "web-2", "db-1"]
    assert len(model.calls_to("ListAgents")) == 2
    assert (await client.get_agent("web-2")).connected is False
    token = await client.create_join_token(labels={"env": "prod"}, ttl=timedelta(hours=2))
    assert token.expires_at == NOW + timedelta(hours=2)
    assert token.token not in repr(token)
    (sent,) = model.calls_to("CreateJoinToken")
    assert isinstance(sent, agents_pb2.CreateJoinTokenRequest)
    assert dict(sent.labels) == {"env": "prod"}
    default = await client.create_join_token()
    assert default.expires_at == NOW + timedelta(hours=1)
    await client.remove_agent("web-2")
    assert "web-2" not in model.agents
    with pytest.raises(errors.InvalidArgumentError, match="labels key"):
        await client.create_join_token(labels={"Bad Key": "x"})


async def test_policy(model: Scripted, client: Client) -> None:
    doc = await client.get_policy()
    assert doc.version == 3
    applied = await client.apply_policy("rules: []\n", expected_version=3)
    assert applied.version == 4
    assert applied.yaml == "rules: []\n"
    with pytest.raises(errors.ConflictError, match="version 4, not 3"):
        await client.apply_policy("rules: []\n", expected_version=3)
    decision = await client.test_policy(
        subject="alice",
        action="deploy",
        agent="web-1",
        duration=timedelta(minutes=30),
        groups=["dev"],
    )
    assert decision.allowed
    assert decision.max_duration == timedelta(hours=1)
    sent = model.calls_to("TestPolicy")[0]
    assert isinstance(sent, policy_pb2.TestPolicyRequest)
    assert list(sent.groups) == ["dev"]
    assert sent.duration.seconds == 1800


async def test_audit_list_sends_filters_and_follows_pages(model: Scripted, client: Client) -> None:
    model.put(*(make_event(n) for n in range(1, 6)))
    events = await client.list_audit(since=NOW + timedelta(seconds=2), agent="web-1")
    assert [e.seq for e in events] == [2, 3, 4, 5]
    first = model.calls_to("ListEvents")[0]
    assert isinstance(first, audit_pb2.ListEventsRequest)
    assert first.since.ToDatetime().isoformat() == "2026-01-01T12:00:02"
    assert first.agent == "web-1"
    with pytest.raises(errors.InvalidArgumentError, match="timezone-aware"):
        await client.list_audit(since=NOW.replace(tzinfo=None))


async def test_tail_audit_sends_backlog_then_new_events(model: Scripted, client: Client) -> None:
    model.put(make_event(1), make_event(2), make_event(3))
    async with aclosing(client.tail_audit(after_seq=1)) as stream:
        assert (await anext(stream)).seq == 2
        assert (await anext(stream)).seq == 3
        await model.publish(make_event(4))
        event = await asyncio.wait_for(anext(stream), 5)
    assert event.seq == 4


async def test_verify_audit(model: Scripted, client: Client) -> None:
    result = await client.verify_audit()
    assert result.ok
    assert result.events_checked == 3


async def test_close_is_idempotent_and_refuses_later_calls(target: str) -> None:
    client = await Client.connect(target, token=TOKEN)
    await client.close()
    await client.close()
    with pytest.raises(RuntimeError, match="closed"):
        await client.get_policy()


async def test_connect_refuses_nonsense(target: str) -> None:
    with pytest.raises(errors.InvalidArgumentError, match="address is empty"):
        await Client.connect(" ")
    with pytest.raises(errors.InvalidArgumentError, match="timeout must be positive"):
        await Client.connect(target, timeout=0)


async def test_several_addresses_over_tls_are_refused_with_what_works() -> None:
    # One channel over several IPs has one TLS name to check, and only the replicas' shared
    # DNS name is on all their certificates: say so, instead of a failed handshake later.
    with pytest.raises(errors.InvalidArgumentError, match="one DNS name") as refused:
        await Client.connect(
            "127.0.0.1:7443,127.0.0.2:7443", credentials=grpc.ssl_channel_credentials()
        )
    assert "--tls-name" in str(refused.value)
    with pytest.raises(errors.InvalidArgumentError, match="plain text only"):
        await Client.connect("10.0.0.1:7443,10.0.0.2:7443", insecure=False)


async def test_a_client_serves_one_loop_per_server(model: Scripted) -> None:
    # Two servers, two clients, one loop: nothing global in the SDK.
    other = Scripted()
    other.put(make_agent("db-1"))
    model.put(make_agent("web-1"))
    async with serve(model) as first, serve(other) as second:
        a = await Client.connect(first, token=TOKEN)
        b = await Client.connect(second, token=TOKEN)
        async with a, b:
            names = await asyncio.gather(a.list_agents(), b.list_agents())
    assert [[x.name for x in agents] for agents in names] == [["web-1"], ["db-1"]]
