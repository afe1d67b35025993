"""Delegated review over real gRPC (issue 13): a notification bridge's token with scope
`review-on-behalf` reviews in the name of a user it authenticated. The coordinator checks that
user's own eligibility against the request's plan, the audit log names both, and the scoped token
can do nothing else; a token without the scope (an admin's included) cannot act for anyone."""

from __future__ import annotations

import json
from datetime import timedelta

import grpc
import pytest

from jitmesh import (
    AuthenticationError,
    Client,
    InvalidArgumentError,
    PermissionDeniedError,
)
from jitmesh.types import RequestState
from jitmesh.v1 import access_pb2, access_pb2_grpc, types_pb2
from tests.e2e import procs
from tests.server.helpers import TOKENS, Env, bearer, channel

M15 = timedelta(minutes=15)
SCOPE = "review-on-behalf"


async def bridge_token(
    env: Env, user: str = "slack-bridge", groups: tuple[str, ...] | list[str] = ("bridges",)
) -> str:
    token, info = await env.admin.create_token(
        user, groups=list(groups), ttl=timedelta(hours=1), label="slack", scopes=[SCOPE]
    )
    assert info.scopes == (SCOPE,)
    return token


async def prod_request(env: Env) -> str:
    request, grant = await env.alice.create_request(
        agent="db-1", action="deploy", duration=M15, reason="hotfix"
    )
    assert request.state is RequestState.PENDING
    assert grant is None
    return request.id


async def test_a_bridge_reviews_as_the_user_it_authenticated(env: Env) -> None:
    token = await bridge_token(env)
    request_id = await prod_request(env)
    async with await Client.connect(env.address, token=token) as bridge:
        # The user's own eligibility decides: dave is not in the plan's sre group, and alice
        # may not approve her own request, whoever relays the click.
        with pytest.raises(PermissionDeniedError):
            await bridge.approve(request_id, on_behalf_of="dave")
        with pytest.raises(PermissionDeniedError):
            await bridge.approve(request_id, on_behalf_of="alice")
        # Names fold as everywhere: "Bob" is bob.
        request, grant = await bridge.approve(request_id, reason="lgtm", on_behalf_of="Bob")
    assert request.state is RequestState.APPROVED
    assert grant is not None
    assert grant.subject == "alice"
    assert [(r.reviewer, r.via) for r in request.reviews] == [("bob", "slack-bridge")]
    events = await env.admin.list_audit(request_id=request_id)
    approved = [e for e in events if e.kind == "request.approved"]
    assert [e.actor for e in approved] == ["bob via slack-bridge"]
    assert all(token not in json.dumps(e.details) for e in events)


async def test_deny_on_behalf_and_users_who_cannot_act(env: Env) -> None:
    token = await bridge_token(env)
    request_id = await prod_request(env)
    await env.admin.set_user_disabled("carol")
    async with await Client.connect(env.address, token=token) as bridge:
        # A disabled or unknown user acts for nobody.
        for user in ("carol", "nobody"):
            with pytest.raises(PermissionDeniedError, match="not an enabled jitmesh user"):
                await bridge.deny(request_id, reason="no", on_behalf_of=user)
        request = await bridge.deny(request_id, reason="change freeze", on_behalf_of="bob")
    assert request.state is RequestState.DENIED
    assert request.decided_by == "bob via slack-bridge"


async def test_a_scoped_token_does_nothing_else(env: Env) -> None:
    token = await bridge_token(env)
    request_id = await prod_request(env)
    async with await Client.connect(env.address, token=token) as bridge:
        with pytest.raises(PermissionDeniedError, match="scoped"):
            await bridge.approve(request_id)  # as itself
        with pytest.raises(PermissionDeniedError, match="scoped"):
            await bridge.list_requests()
        with pytest.raises(PermissionDeniedError, match="scoped"):
            await bridge.get_request(request_id)
        with pytest.raises(PermissionDeniedError, match="scoped"):
            await bridge.create_request(agent="db-1", action="deploy", duration=M15, reason="x")
        with pytest.raises(PermissionDeniedError, match="scoped"):
            await bridge.whoami()
    # The raw call, as a bridge written in another language would make it: a streaming call is
    # refused the same way.
    async with channel(env.address) as ch:
        stub = access_pb2_grpc.AccessStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.WatchRequests(
                access_pb2.WatchRequestsRequest(), metadata=bearer(token)
            ):
                pass
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert token not in (refused.value.details() or "")
    assert (await env.bob.get_request(request_id)).state is RequestState.PENDING


async def test_without_the_scope_nobody_acts_for_another(env: Env) -> None:
    request_id = await prod_request(env)
    # Neither a peer approver nor an admin can name someone else; the raw field is refused
    # just like the SDK's argument.
    with pytest.raises(PermissionDeniedError, match=SCOPE):
        await env.carol.approve(request_id, on_behalf_of="bob")
    with pytest.raises(PermissionDeniedError, match=SCOPE):
        await env.admin.approve(request_id, on_behalf_of="bob")
    async with channel(env.address) as ch:
        stub = access_pb2_grpc.AccessStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ReviewRequest(
                access_pb2.ReviewRequestRequest(
                    id=request_id,
                    decision=types_pb2.REVIEW_DECISION_APPROVE,
                    on_behalf_of="bob",
                ),
                metadata=bearer(TOKENS["alice"]),
            )
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    request = await env.bob.get_request(request_id)
    assert request.state is RequestState.PENDING
    assert request.reviews == ()
    refusals = [e for e in await env.admin.list_audit(request_id=request_id) if e.actor != "alice"]
    assert refusals == []


async def test_a_revoked_bridge_token_is_refused_and_scopes_are_checked(env: Env) -> None:
    token = await bridge_token(env)
    request_id = await prod_request(env)
    [info] = [t for t in await env.admin.list_tokens("slack-bridge")]
    assert info.scopes == (SCOPE,)
    await env.admin.revoke_token(info.id)
    async with await Client.connect(env.address, token=token) as bridge:
        with pytest.raises(AuthenticationError):
            await bridge.approve(request_id, on_behalf_of="bob")
    with pytest.raises(InvalidArgumentError, match="unknown scope"):
        await env.admin.create_token("slack-bridge", scopes=["review-everything"])
    with pytest.raises(PermissionDeniedError):
        await env.bob.create_token("bob", scopes=[SCOPE])


async def test_jitctl_creates_a_bridge_token_and_reviews_on_behalf(env: Env) -> None:
    admin = {"JITMESH_TOKEN": TOKENS["admin"], "JITMESH_COORDINATOR": env.address}
    code, out, err = await procs.jitctl(
        "-o", "json", "token", "create", "--user", "slack-bridge", "--group", "bridges",
        "--scope", SCOPE, env=admin,
    )  # fmt: skip
    assert code == 0, err
    made = json.loads(out)
    assert made["scopes"] == [SCOPE]
    request_id = await prod_request(env)
    bridge = {"JITMESH_TOKEN": made["token"], "JITMESH_COORDINATOR": env.address}
    code, out, err = await procs.jitctl(
        "-o", "json", "request", "approve", request_id, "--on-behalf-of", "bob", env=bridge
    )
    assert code == 0, err
    approved = json.loads(out)
    assert approved["state"] == "APPROVED"
    assert [(r["reviewer"], r["via"]) for r in approved["reviews"]] == [("bob", "slack-bridge")]
    code, out, err = await procs.jitctl("request", "show", request_id, env=admin)
    assert code == 0, err
    assert "approve by bob via slack-bridge" in out
    code, out, err = await procs.jitctl("token", "list", "--user", "slack-bridge", env=admin)
    assert code == 0, err
    assert SCOPE in out
    assert made["token"] not in out


async def test_a_bridge_never_approves_its_own_request_nor_reviews_as_itself(env: Env) -> None:
    # A scoped token made for a person who also files requests (alice): relaying bob's name does
    # not let alice approve her own request under it; the refusal is the self-approval one.
    token = await bridge_token_of_existing(env, "alice")
    request_id = await prod_request(env)
    async with await Client.connect(env.address, token=token) as bridge:
        with pytest.raises(PermissionDeniedError, match="own request") as refused:
            await bridge.approve(request_id, reason="lgtm", on_behalf_of="bob")
        assert refused.value.reason == "SELF_APPROVAL"
    assert (await env.bob.get_request(request_id)).reviews == ()
    # A bridge in an approver group (sre-bridge) may not name itself: it never reviews as
    # itself, with or without on_behalf_of.
    relay = await bridge_token(env, "sre-bridge", groups=["sre"])
    async with await Client.connect(env.address, token=relay) as bridge:
        with pytest.raises(PermissionDeniedError, match="itself"):
            await bridge.approve(request_id, on_behalf_of="SRE-Bridge")
    request = await env.bob.get_request(request_id)
    assert request.state is RequestState.PENDING
    assert request.reviews == ()


async def bridge_token_of_existing(env: Env, user: str) -> str:
    token, info = await env.admin.create_token(
        user, ttl=timedelta(hours=1), label="relay", scopes=[SCOPE]
    )
    assert info.scopes == (SCOPE,)
    return token
