"""Operator tokens through the real interfaces: admins create (shown once, hashed, expiring),
list (never the token), revoke; a revoked or expired token and a disabled user are refused on the
next call; non-admins can do none of it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from jitmesh import (
    AuthenticationError,
    Client,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from tests.e2e import procs
from tests.server.helpers import TOKENS, Env


async def test_token_lifecycle_and_disabled_users(env: Env) -> None:
    token, info = await env.admin.create_token(
        "erin", groups=["developers"], ttl=timedelta(hours=1), label="ci"
    )
    assert token.startswith("jmt_")
    listed = {t.id: t for t in await env.admin.list_tokens("erin")}
    assert list(listed) == [info.id]
    assert token not in repr(listed)
    assert token[:16] != info.id
    async with await Client.connect(env.address, token=token) as erin:
        await erin.list_requests()
        await env.admin.set_user_disabled("erin")
        with pytest.raises(AuthenticationError):
            await erin.list_requests()
        await env.admin.set_user_disabled("erin", False)
        await erin.list_requests()
        await env.admin.revoke_token(info.id)
        with pytest.raises(AuthenticationError):
            await erin.list_requests()
    with pytest.raises(NotFoundError):
        await env.admin.revoke_token(info.id)  # already revoked
    events = await env.admin.list_audit(since=None, subject="erin")
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["user.token_created", "user.disabled"]
    assert all(token not in str(e.details) for e in events)


async def test_tokens_expire(env: Env) -> None:
    token, _ = await env.admin.create_token("erin", groups=["developers"], ttl=timedelta(minutes=5))
    async with await Client.connect(env.address, token=token) as erin:
        await erin.list_requests()
        await env.clock.advance(timedelta(minutes=6))
        with pytest.raises(AuthenticationError):
            await erin.list_requests()


async def test_only_admins_manage_tokens_and_bounds_hold(env: Env) -> None:
    with pytest.raises(PermissionDeniedError):
        await env.alice.create_token("alice", groups=["admins"])
    with pytest.raises(PermissionDeniedError):
        await env.alice.list_tokens()
    with pytest.raises(PermissionDeniedError):
        await env.alice.set_user_disabled("bob")
    for ttl in (timedelta(seconds=1), timedelta(days=366)):
        with pytest.raises(InvalidArgumentError):
            await env.admin.create_token("erin", groups=["x"], ttl=ttl)
    with pytest.raises(InvalidArgumentError):
        await env.admin.create_token("nobody-yet")  # a new user needs a group
    with pytest.raises(InvalidArgumentError):
        await env.admin.set_user_disabled("admin")  # not oneself


async def test_jitctl_token_commands(env: Env) -> None:
    environ = {"JITMESH_TOKEN": TOKENS["admin"], "JITMESH_COORDINATOR": env.address}

    async def jitctl(*args: str) -> str:
        code, out, err = await procs.jitctl(*args, env=environ)
        assert code == 0, err
        return out

    created = await jitctl(
        "-o", "json", "token", "create", "--user", "erin", "--group", "sre", "--ttl", "2h"
    )
    assert '"token": "jmt_' in created
    listed = await jitctl("token", "list", "--user", "erin")
    assert "erin" in listed
    assert "jmt_" not in listed
