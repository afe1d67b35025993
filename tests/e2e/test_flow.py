"""The whole just-in-time flow in one event loop: request, approval, push, enforcement on the
host, revoke, release, expiry on the agent, reconnect and resume, overlapping grants."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.store.readonly import find_allowing
from jitmesh import (
    ConflictError,
    GrantState,
    InvalidArgumentError,
    PermissionDeniedError,
    RequestState,
)
from jitmesh.clock import to_ms

from .conftest import Mesh, wait_until


async def grant_state(mesh: Mesh, grant_id: str) -> GrantState:
    return (await mesh.client("admin").get_grant(grant_id)).state


async def test_self_service_request_is_enforced_on_the_host_at_once(mesh: Mesh) -> None:
    staging = await mesh.start_agent("staging-1", "staging")
    alice = mesh.client("alice")
    request, grant = await alice.create_request(
        agent="staging-1", action="deploy", duration=timedelta(minutes=15)
    )
    assert request.state is RequestState.APPROVED
    assert grant is not None
    assert grant.state is GrantState.PENDING_DELIVERY
    await wait_until(lambda: staging.marker("alice", "deploy").exists())
    await wait_until(lambda: _is(mesh, grant.id, GrantState.ACTIVE))
    events = await mesh.client("admin").list_audit(since=None, grant_id=grant.id)
    kinds = [e.kind for e in events]
    assert "grant.created" in kinds
    assert "grant.applied" in kinds


async def test_prod_request_needs_a_reason_and_an_sre_approval_not_self(mesh: Mesh) -> None:
    prod = await mesh.start_agent("prod-1", "prod")
    alice, bob = mesh.client("alice"), mesh.client("bob")
    with pytest.raises(InvalidArgumentError, match="requires a reason"):
        await alice.create_request(agent="prod-1", action="deploy", duration=timedelta(minutes=5))
    request, grant = await alice.create_request(
        agent="prod-1", action="deploy", duration=timedelta(minutes=5), reason="INC-42"
    )
    assert request.state is RequestState.PENDING
    assert grant is None
    with pytest.raises(PermissionDeniedError):
        await alice.approve(request.id)
    # bob asks for himself under the sre-prod rule; he cannot approve that one either.
    own, _ = await bob.create_request(
        agent="prod-1", action="shell", duration=timedelta(minutes=5), reason="INC-42"
    )
    with pytest.raises(PermissionDeniedError, match="own request"):
        await bob.approve(own.id)
    assert not prod.marker("alice", "deploy").exists()

    approved, grant = await bob.approve(request.id, reason="ok")
    assert approved.state is RequestState.APPROVED
    assert grant is not None
    await wait_until(lambda: prod.marker("alice", "deploy").exists())
    await wait_until(lambda: _is(mesh, grant.id, GrantState.ACTIVE))
    assert lookup_active(prod.state, "alice", "deploy") is not None
    with pytest.raises(ConflictError):
        await mesh.client("carol").deny(request.id)

    revoked = await bob.revoke_grant(grant.id, reason="done")
    assert revoked.state in (GrantState.REVOKING, GrantState.REVOKED)
    await wait_until(lambda: not prod.marker("alice", "deploy").exists())
    await wait_until(lambda: _is(mesh, grant.id, GrantState.REVOKED))
    assert lookup_active(prod.state, "alice", "deploy") is None


async def test_release_and_expiry_on_the_agent(mesh: Mesh) -> None:
    staging = await mesh.start_agent("staging-1", "staging")
    alice = mesh.client("alice")
    _, kept = await alice.create_request(
        agent="staging-1", action="restart", duration=timedelta(minutes=10)
    )
    _, short = await alice.create_request(
        agent="staging-1", action="logs", duration=timedelta(seconds=1)
    )
    assert kept is not None
    assert short is not None
    await wait_until(lambda: staging.marker("alice", "restart").exists())
    # The short grant ends on the agent by itself, and the agent reports it.
    await wait_until(lambda: _is(mesh, short.id, GrantState.EXPIRED))
    await wait_until(lambda: not staging.marker("alice", "logs").exists())

    async def reported() -> bool:
        events = await mesh.client("admin").list_audit(since=None, grant_id=short.id)
        return any(e.kind == "agent.grant.expired" for e in events)

    await wait_until(reported)
    with pytest.raises(PermissionDeniedError):
        await mesh.client("bob").release_grant(kept.id)
    await wait_until(lambda: _is(mesh, kept.id, GrantState.ACTIVE))
    await alice.release_grant(kept.id)
    await wait_until(lambda: _is(mesh, kept.id, GrantState.RELEASED))
    assert not staging.marker("alice", "restart").exists()
    verification = await mesh.client("admin").verify_audit()
    assert verification.ok
    assert verification.events_checked > 10


async def test_agent_catches_up_after_being_away(mesh: Mesh) -> None:
    staging = await mesh.start_agent("staging-1", "staging")
    await staging.shutdown()
    await mesh.wait_connected("staging-1", connected=False)
    alice = mesh.client("alice")
    _, grant = await alice.create_request(
        agent="staging-1", action="deploy", duration=timedelta(minutes=10)
    )
    assert grant is not None
    assert await grant_state(mesh, grant.id) is GrantState.PENDING_DELIVERY
    assert not staging.marker("alice", "deploy").exists()
    staging = await mesh.start_agent("staging-1", "staging")
    await wait_until(lambda: staging.marker("alice", "deploy").exists())
    await wait_until(lambda: _is(mesh, grant.id, GrantState.ACTIVE))


async def test_overlapping_grants_keep_access_until_the_last_one_ends(mesh: Mesh) -> None:
    staging = await mesh.start_agent("staging-1", "staging")
    alice, admin = mesh.client("alice"), mesh.client("admin")
    _, first = await alice.create_request(
        agent="staging-1", action="deploy", duration=timedelta(minutes=10)
    )
    _, second = await alice.create_request(
        agent="staging-1", action="deploy", duration=timedelta(minutes=20)
    )
    assert first is not None
    assert second is not None
    await wait_until(lambda: _is(mesh, second.id, GrantState.ACTIVE))
    await admin.revoke_grant(first.id, reason="one of two")
    await wait_until(lambda: _is(mesh, first.id, GrantState.REVOKED))
    assert staging.marker("alice", "deploy").exists()
    assert lookup_active(staging.state, "alice", "deploy") is not None
    await admin.revoke_grant(second.id, reason="the other")
    await wait_until(lambda: _is(mesh, second.id, GrantState.REVOKED))
    assert not staging.marker("alice", "deploy").exists()


def lookup_active(state: Path, subject: str, action: str) -> object:
    """What `jitmesh-agent check` answers from the agent's lease table."""
    return find_allowing(state / "agent.db", subject, action, to_ms(datetime.now(UTC)))


async def _is(mesh: Mesh, grant_id: str, state: GrantState) -> bool:
    return await grant_state(mesh, grant_id) is state
