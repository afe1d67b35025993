"""Operator tokens through the real interfaces: admins create (shown once, hashed, expiring),
list (never the token), revoke; a revoked or expired token and a disabled user are refused on the
next call; non-admins can do none of it."""

from __future__ import annotations

import json
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


async def test_a_token_never_changes_an_existing_users_groups(env: Env) -> None:
    # Issue 10 item H: issuing a token for alice with --group sre used to make her (and every
    # token she already holds) sre.
    with pytest.raises(InvalidArgumentError, match="user set-groups"):
        await env.admin.create_token("ALICE", groups=["sre"])
    assert await env.coordinator.store.user_groups("alice") == frozenset({"developers"})
    # The same groups, or none, are fine; a new user is still made with the groups given.
    await env.admin.create_token("alice", groups=["developers"])
    await env.admin.create_token("alice")
    await env.admin.create_token("erin", groups=["sre"])
    assert await env.coordinator.store.user_groups("erin") == frozenset({"sre"})


async def test_changing_groups_is_its_own_audited_act(env: Env) -> None:
    with pytest.raises(PermissionDeniedError):
        await env.alice.set_user_groups("alice", ["admins"])
    with pytest.raises(NotFoundError, match="no such user"):
        await env.admin.set_user_groups("nobody", ["sre"])
    with pytest.raises(InvalidArgumentError, match="at least one group"):
        await env.admin.set_user_groups("alice", [])
    with pytest.raises(InvalidArgumentError, match="admins group"):
        await env.admin.set_user_groups("admin", ["sre"])
    info = await env.admin.set_user_groups("Alice", ["developers", "sre"], reason="on call")
    assert (info.name, info.groups, info.disabled) == ("alice", ("developers", "sre"), False)
    # Her existing token carries the new groups on its next call: she may now list what sre
    # approves (and her token was never re-issued).
    assert await env.coordinator.store.user_groups("alice") == frozenset({"developers", "sre"})
    [event] = await env.admin.list_audit(kind="user.groups_changed")
    assert (event.actor, event.subject) == ("admin", "alice")
    assert event.details == {"before": "developers", "after": "developers,sre", "reason": "on call"}


async def test_jitctl_join_tokens_and_groups(env: Env) -> None:
    # Issue 10 items 4 and H from the command line.
    environ = {"JITMESH_TOKEN": TOKENS["admin"], "JITMESH_COORDINATOR": env.address}
    code, out, err = await procs.jitctl(
        "agent", "token", "create", "--replace", "web-1", "-o", "json", env=environ
    )
    assert code == 0, err
    made = json.loads(out)
    assert len(made["id"]) == 16
    assert (made["labels"], made["replaces"]) == ({"env": "staging"}, "web-1")
    code, out, err = await procs.jitctl("agent", "token", "list", "-o", "json", env=environ)
    assert code == 0, err
    assert [t["id"] for t in json.loads(out)] == [made["id"]]
    assert made["token"] not in out
    code, out, err = await procs.jitctl(
        "agent", "token", "revoke", made["id"], "--reason", "leaked", env=environ
    )
    assert (code, out.strip()) == (0, f"revoked join token {made['id']}"), err
    code, out, err = await procs.jitctl("agent", "token", "list", env=environ)
    assert made["id"] not in out

    code, out, err = await procs.jitctl(
        "token", "create", "--user", "alice", "--group", "sre", env=environ
    )
    assert code != 0
    assert "jitctl user set-groups alice" in err
    code, out, err = await procs.jitctl(
        "user", "set-groups", "alice", "--group", "developers", "--group", "sre", "-o", "json",
        env=environ,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["groups"] == ["developers", "sre"]
