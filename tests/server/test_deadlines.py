"""Decisions check the pending deadline themselves (issue 9, item D): between a request's
`pending_expires_at` and the next expiry sweep, nobody can approve (or deny, or cancel) it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from jitmesh import RequestState
from jitmesh.errors import ConflictError
from tests.server.helpers import Env

M15 = timedelta(minutes=15)


async def pending_prod_request(env: Env) -> str:
    request, grant = await env.alice.create_request(
        agent="db-1", action="deploy", duration=M15, reason="release 42"
    )
    assert grant is None
    assert request.pending_expires_at is not None
    await env.clock.advance(request.pending_expires_at - env.clock.now())
    return request.id


async def test_an_expired_pending_request_cannot_be_approved_before_the_sweep(env: Env) -> None:
    request_id = await pending_prod_request(env)
    with pytest.raises(ConflictError, match="expired"):
        await env.bob.approve(request_id)
    assert await env.admin.list_grants() == []
    assert (await env.admin.get_request(request_id)).state is not RequestState.APPROVED
    assert [e for e in await env.admin.list_audit(kind="request.approved")] == []


async def test_an_expired_pending_request_cannot_be_denied_or_cancelled(env: Env) -> None:
    request_id = await pending_prod_request(env)
    with pytest.raises(ConflictError, match="expired"):
        await env.bob.deny(request_id)
    with pytest.raises(ConflictError, match="expired"):
        await env.alice.cancel(request_id)


async def test_a_request_is_reviewable_until_its_deadline(env: Env) -> None:
    request, _ = await env.alice.create_request(
        agent="db-1", action="deploy", duration=M15, reason="release 42"
    )
    assert request.pending_expires_at is not None
    await env.clock.advance(request.pending_expires_at - env.clock.now() - timedelta(seconds=1))
    _, grant = await env.bob.approve(request.id)
    assert grant is not None
