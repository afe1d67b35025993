"""watch_requests and wait_for_request over the WatchRequests server stream."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import replace

import grpc
import pytest

from jitmesh import errors
from jitmesh.client import Client
from jitmesh.types import GrantState, Request, RequestState
from tests.sdk.scripted import Scripted, approved, make_grant, make_request, rid


def _active(request: Request) -> bool:
    return request.grant_state is GrantState.ACTIVE


async def test_watch_sends_the_current_snapshot_then_changes(
    model: Scripted, client: Client
) -> None:
    pending = make_request(1)
    grant = make_grant(1, state=GrantState.PENDING_DELIVERY)
    model.put(pending)
    model.watch_script = [approved(pending, grant)]
    async with aclosing(client.watch_requests([rid(1)])) as stream:
        first = await asyncio.wait_for(anext(stream), 5)
        second = await asyncio.wait_for(anext(stream), 5)
    assert first.state is RequestState.PENDING
    assert second.state is RequestState.APPROVED
    assert second.grant_state is GrantState.PENDING_DELIVERY


async def test_wait_returns_the_first_snapshot_that_satisfies(
    model: Scripted, client: Client
) -> None:
    pending = make_request(1)
    grant = make_grant(1, state=GrantState.PENDING_DELIVERY)
    model.put(pending)
    model.watch_script = [
        replace(pending, reason="edited"),
        approved(pending, grant),
        approved(pending, replace(grant, state=GrantState.ACTIVE)),
    ]
    result = await client.wait_for_request(
        rid(1), until=lambda r: r.state is RequestState.APPROVED, timeout=5
    )
    # Not the pending ones before it, not the later ACTIVE one.
    assert result.state is RequestState.APPROVED
    assert result.grant_state is GrantState.PENDING_DELIVERY


async def test_wait_returns_at_once_when_already_satisfied(model: Scripted, client: Client) -> None:
    model.put(approved(make_request(1), make_grant(1)))
    result = await client.wait_for_request(
        rid(1), until=lambda r: r.state is RequestState.APPROVED, timeout=5
    )
    assert result.state is RequestState.APPROVED
    assert len(model.calls_to("WatchRequests")) == 1


async def test_wait_subscribes_again_when_the_stream_ends(model: Scripted, client: Client) -> None:
    pending = make_request(1)
    model.put(pending)
    model.watch_breaks = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    model.watch_script = [approved(pending, make_grant(1))]
    result = await client.wait_for_request(rid(1), until=_active, timeout=10)
    assert result.grant_state is GrantState.ACTIVE
    assert len(model.calls_to("WatchRequests")) == 3


async def test_wait_gives_up_after_the_timeout_with_the_last_state(
    model: Scripted, client: Client
) -> None:
    model.put(make_request(1))
    model.subscribed = asyncio.Event()
    with pytest.raises(errors.DeadlineExceededError, match="still pending") as caught:
        await client.wait_for_request(rid(1), until=_active, timeout=0.3)
    assert model.subscribed.is_set()
    assert rid(1) in str(caught.value)


async def test_wait_raises_other_errors_at_once(model: Scripted, client: Client) -> None:
    model.fail("WatchRequests", grpc.StatusCode.NOT_FOUND, "no such request")
    with pytest.raises(errors.NotFoundError, match="no such request"):
        await client.wait_for_request(rid(1), until=_active, timeout=30)
