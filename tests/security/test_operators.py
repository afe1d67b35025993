"""Operator-side attacks through the SDK against a real coordinator: self-approval under name
variants, approvers outside the rule, approve/deny races, privilege-raising actions, request
floods, disabled users."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from jitmesh import (
    AuthenticationError,
    Client,
    ConflictError,
    InvalidArgumentError,
    PermissionDeniedError,
    RateLimitedError,
    RequestState,
)
from jitmesh.v1 import identity_pb2
from jitmesh.v1.identity_pb2_grpc import IdentityStub
from server.app import Coordinator, build
from server.config import CoordinatorConfig
from server.domain.policy import DEV_POLICY
from tests.server.helpers import ADMIN, TOKENS, USERS, Env, raw_sql

MIN = timedelta(minutes=1)


async def prod_request(env: Env, user: str = "alice") -> str:
    request, grant = await env.clients[user].create_request(
        agent="db-1", action="deploy", duration=5 * MIN, reason="INC-1"
    )
    assert request.state is RequestState.PENDING
    assert grant is None
    return request.id


async def test_nobody_approves_their_own_request_under_any_spelling(env: Env) -> None:
    request_id = await prod_request(env)
    for variant in ("ALICE", "Alice", "alice"):
        token = f"jmt_variant_{variant}_0123456789abcdef"
        await env.coordinator.identity.ensure_user(variant, ["sre", "admins"], token)
        async with await Client.connect(env.address, token=token) as client:
            with pytest.raises(PermissionDeniedError):
                await client.approve(request_id)
    assert (await env.admin.get_request(request_id)).state is RequestState.PENDING


async def test_an_approver_outside_the_rules_groups_cannot_approve(env: Env) -> None:
    request_id = await prod_request(env)
    for outsider in ("dave", "admin"):  # developers; admins (not named by the rule)
        with pytest.raises(PermissionDeniedError):
            await env.clients[outsider].approve(request_id)
    assert (await env.admin.get_request(request_id)).state is RequestState.PENDING


async def test_approve_deny_races_have_one_winner_and_a_denied_request_has_no_grant(
    env: Env,
) -> None:
    outcomes = set()
    for _ in range(10):
        request_id = await prod_request(env)
        approve, deny = await asyncio.gather(
            env.bob.approve(request_id), env.carol.deny(request_id), return_exceptions=True
        )
        final = await env.admin.get_request(request_id)
        grants = [g for g in await env.admin.list_grants() if g.request_id == request_id]
        if isinstance(deny, BaseException):
            assert isinstance(deny, ConflictError)
            assert not isinstance(approve, BaseException)
            assert final.state is RequestState.APPROVED
        else:
            assert isinstance(approve, ConflictError)
            assert final.state is RequestState.DENIED
            assert grants == []
        outcomes.add(final.state)
        if final.grant_id:
            # Ended, so that the next request asks again instead of reusing this grant.
            await env.admin.revoke_grant(final.grant_id)
    assert outcomes <= {RequestState.APPROVED, RequestState.DENIED}


async def test_actions_can_never_name_a_coordinator_role(env: Env) -> None:
    for reserved in ("admins", "admin", "approver", "approvers", "jitmesh-admin", "admin-ui"):
        text = DEV_POLICY.replace("actions: [deploy, restart,", f"actions: [{reserved}, restart,")
        with pytest.raises(InvalidArgumentError, match="reserved"):
            await env.admin.apply_policy(text)
    with pytest.raises(InvalidArgumentError):
        await env.alice.create_request(agent="web-1", action="admins", duration=5 * MIN)


async def test_request_floods_are_rate_limited_per_caller(tmp_path: Path, env: Env) -> None:
    config = CoordinatorConfig(
        data_dir=tmp_path / "limited",
        port=0,
        default_policy=DEV_POLICY,
        request_rate=1.0,
        request_burst=30,
    )
    limited = await build(config, clock=env.clock)
    try:
        await flood(limited, env)
    finally:
        await limited.stop()


async def flood(coordinator: Coordinator, env: Env) -> None:
    for name in ("alice", "dave"):
        await coordinator.identity.ensure_user(name, USERS[name], TOKENS[name])
    join, _ = await coordinator.fleet.create_join_token(ADMIN, {"env": "staging"}, None)
    await coordinator.fleet.enroll(join, "web-1", {})
    address = f"127.0.0.1:{coordinator.port}"
    alice = await Client.connect(address, token=TOKENS["alice"])
    dave = await Client.connect(address, token=TOKENS["dave"])
    async with alice, dave:
        await flood_as(alice, dave)


async def flood_as(alice: Client, dave: Client) -> None:
    for _ in range(30):  # the burst
        await alice.create_request(agent="web-1", action="logs", duration=MIN)
    with pytest.raises(RateLimitedError) as refused:
        await alice.create_request(agent="web-1", action="logs", duration=MIN)
    assert "alice" not in str(refused.value)
    # Another caller is still served.
    request, _ = await dave.create_request(agent="web-1", action="logs", duration=MIN)
    assert request.state is RequestState.APPROVED


async def test_a_disabled_users_next_call_is_refused(env: Env) -> None:
    await env.alice.list_requests()
    raw_sql(env.coordinator.config.data_dir / "coordinator.db", "UPDATE users SET disabled = 1")
    with pytest.raises(AuthenticationError):
        await env.alice.list_requests()


async def test_name_variants_are_one_principal(env: Env) -> None:
    """Upper case, mixed case and full-width forms of a name reach the same user row: a token
    made for "ALICE" is alice's, so she cannot approve her own request with it, and disabling
    "Alice" disables every one of them."""
    request_id = await prod_request(env)
    # She becomes an sre on purpose (a token never changes groups): only sameness stops her.
    await env.admin.set_user_groups("Alice", ["developers", "sre"])
    token, info = await env.admin.create_token("ALICE")
    assert info.user == "alice"
    async with await Client.connect(env.address, token=token) as variant:
        with pytest.raises(PermissionDeniedError):
            await variant.approve(request_id)
    # Past the SDK's own checks (a raw call), full-width letters fold to the same user.
    async with grpc.aio.insecure_channel(env.address) as ch:
        created = await IdentityStub(ch).CreateToken(
            identity_pb2.CreateTokenRequest(user="ＡＬＩＣＥ"),
            metadata=(("authorization", f"Bearer {TOKENS['admin']}"),),
            timeout=10,
        )
    assert created.info.user == "alice"
    async with await Client.connect(env.address, token=created.token) as wide:
        with pytest.raises(PermissionDeniedError):
            await wide.approve(request_id)
    assert {t.user for t in await env.admin.list_tokens("Alice")} == {"alice"}
    assert len(await env.admin.list_tokens("ALICE")) == 3
    db = env.coordinator.config.data_dir / "coordinator.db"
    assert raw_sql(db, "SELECT name FROM users WHERE lower(name) = 'alice'") == [("alice",)]
    # Filters and policy tests take any spelling too.
    assert [r.id for r in await env.admin.list_requests(subject="ALICE")] == [request_id]
    await env.admin.set_user_disabled("Alice")
    for secret in (TOKENS["alice"], token, created.token):
        async with await Client.connect(env.address, token=secret) as client:
            with pytest.raises(AuthenticationError):
                await client.list_requests()
    assert (await env.admin.get_request(request_id)).state is RequestState.PENDING
