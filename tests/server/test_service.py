"""The coordinator's operator API end to end: a real gRPC server in the test's event loop, the
public SDK as the caller, a fake clock for time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc import aio

from jitmesh import (
    AuthenticationError,
    ConflictError,
    GrantState,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    Request,
    RequestState,
    ReviewDecision,
)
from jitmesh.client import Client
from jitmesh.v1 import access_pb2, access_pb2_grpc, audit_pb2, audit_pb2_grpc, types_pb2
from server.app import Coordinator
from server.domain.models import AuditEntry, ObservedKind
from server.domain.policy import DEV_POLICY
from tests.server.helpers import T0, TOKENS, WAIT, Env, bearer, channel, raw_sql

M15 = timedelta(minutes=15)


async def prod_request(env: Env, reason: str = "release 42") -> str:
    request, grant = await env.alice.create_request(
        agent="db-1", action="deploy", duration=M15, reason=reason
    )
    assert request.state is RequestState.PENDING
    assert grant is None
    return request.id


async def staging_grant(env: Env, duration: timedelta = M15) -> tuple[str, str]:
    request, grant = await env.alice.create_request(
        agent="web-1", action="deploy", duration=duration
    )
    assert grant is not None
    return request.id, grant.id


@contextlib.asynccontextmanager
async def running(coordinator: Coordinator) -> AsyncIterator[None]:
    """The coordinator's background loops (expiry) running; stopped again on exit."""
    task = asyncio.create_task(coordinator.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def raw_access(env: Env) -> AsyncIterator[access_pb2_grpc.AccessStub]:
    """The Access service without the SDK's own input checks, to test the server's."""
    async with channel(env.address) as ch:
        yield access_pb2_grpc.AccessStub(ch)


async def all_requests(env: Env) -> list[str]:
    return sorted(r.id for r in await env.admin.list_requests())


async def audit_kinds(env: Env, **filters: str) -> list[str]:
    return [e.kind for e in await env.admin.list_audit(**filters)]  # type: ignore[arg-type]


# Creating requests.


async def test_auto_approved_request_in_staging(env: Env) -> None:
    request, grant = await env.alice.create_request(
        agent="web-1", action="deploy", duration=M15, reason="hotfix"
    )
    assert request.state is RequestState.APPROVED
    assert request.rule == "staging-self-service"
    assert request.decided_by == "policy:staging-self-service"
    assert request.pending_expires_at is None
    assert grant is not None
    assert grant.grant_seq == 1
    assert grant.state is GrantState.PENDING_DELIVERY
    assert (grant.agent, grant.subject, grant.action) == ("web-1", "alice", "deploy")
    assert grant.not_before == T0
    assert grant.not_after == T0 + M15
    assert grant.epoch == env.coordinator.epoch
    assert request.grant_id == grant.id
    assert await env.alice.get_grant(grant.id) == grant
    kinds = await audit_kinds(env, request_id=request.id)
    assert kinds == ["request.created", "request.approved", "grant.created"]
    _, second = await staging_grant(env)
    assert (await env.alice.get_grant(second)).grant_seq == 2


async def test_prod_request_needs_a_reason(env: Env) -> None:
    before = await all_requests(env)
    with pytest.raises(InvalidArgumentError, match="requires a reason"):
        await env.alice.create_request(agent="db-1", action="deploy", duration=M15)
    with pytest.raises(InvalidArgumentError, match="requires a reason"):
        await env.alice.create_request(agent="db-1", action="deploy", duration=M15, reason="  ")
    assert await all_requests(env) == before
    request_id = await prod_request(env)
    request = await env.alice.get_request(request_id)
    assert request.state is RequestState.PENDING
    assert request.rule == "prod-with-approval"
    assert request.approvals_required == 1
    assert request.approver_groups == ("sre",)
    assert request.pending_expires_at == T0 + timedelta(hours=1)
    assert await env.admin.list_grants() == []


async def test_policy_refusal_is_audited(env: Env) -> None:
    with pytest.raises(PermissionDeniedError, match="default deny"):
        await env.bob.create_request(agent="web-1", action="deploy", duration=M15)
    events = await env.admin.list_audit(kind="request.refused")
    assert [(e.subject, e.agent, e.details["action"]) for e in events] == [
        ("bob", "web-1", "deploy")
    ]
    assert await all_requests(env) == []


async def test_unknown_agent(env: Env) -> None:
    with pytest.raises(NotFoundError):
        await env.alice.create_request(agent="nope-1", action="deploy", duration=M15)


async def test_unknown_action(env: Env) -> None:
    with pytest.raises(InvalidArgumentError, match="unknown action"):
        await env.alice.create_request(agent="web-1", action="nuke", duration=M15)
    assert await all_requests(env) == []


@pytest.mark.parametrize("seconds", [0, -1, -3600])
async def test_duration_not_positive_is_refused(env: Env, seconds: int) -> None:
    # The SDK refuses before sending; the coordinator refuses too when a caller skips the SDK.
    with pytest.raises(InvalidArgumentError):
        await env.alice.create_request(
            agent="web-1", action="deploy", duration=timedelta(seconds=seconds)
        )
    async with raw_access(env) as stub:
        with pytest.raises(aio.AioRpcError) as info:
            await stub.CreateRequest(
                access_pb2.CreateRequestRequest(
                    agent="web-1", action="deploy", duration=Duration(seconds=seconds)
                ),
                metadata=bearer(TOKENS["alice"]),
            )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert await all_requests(env) == []
    assert await audit_kinds(env, subject="alice") == ["user.token_registered"]


async def test_missing_duration_is_refused(env: Env) -> None:
    async with raw_access(env) as stub:
        with pytest.raises(aio.AioRpcError) as info:
            await stub.CreateRequest(
                access_pb2.CreateRequestRequest(agent="web-1", action="deploy"),
                metadata=bearer(TOKENS["alice"]),
            )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "duration is required" in (info.value.details() or "")


async def test_duration_above_the_rules_maximum_is_refused(env: Env) -> None:
    with pytest.raises(InvalidArgumentError, match=r"above the maximum 1h of rule staging"):
        await env.alice.create_request(
            agent="web-1", action="deploy", duration=timedelta(hours=1, seconds=1)
        )
    with pytest.raises(InvalidArgumentError, match="at most 366d"):
        await env.alice.create_request(agent="web-1", action="deploy", duration=timedelta(days=400))
    assert await all_requests(env) == []
    assert await env.admin.list_grants() == []
    _, grant_id = await staging_grant(env, timedelta(hours=1))  # the maximum itself is fine
    assert (await env.alice.get_grant(grant_id)).not_after == T0 + timedelta(hours=1)


async def test_oversized_reason_is_refused(env: Env) -> None:
    reason = "x" * 1025
    with pytest.raises(InvalidArgumentError, match="longer than 1024"):
        await env.alice.create_request(agent="db-1", action="deploy", duration=M15, reason=reason)
    async with raw_access(env) as stub:
        with pytest.raises(aio.AioRpcError) as info:
            await stub.CreateRequest(
                access_pb2.CreateRequestRequest(
                    agent="db-1", action="deploy", duration=Duration(seconds=60), reason=reason
                ),
                metadata=bearer(TOKENS["alice"]),
            )
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert reason not in (info.value.details() or "")
        request_id = await prod_request(env)
        with pytest.raises(aio.AioRpcError) as review:
            await stub.ReviewRequest(
                access_pb2.ReviewRequestRequest(
                    id=request_id, decision=types_pb2.REVIEW_DECISION_APPROVE, reason=reason
                ),
                metadata=bearer(TOKENS["bob"]),
            )
        assert review.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert await all_requests(env) == [request_id]
    assert (await env.bob.get_request(request_id)).state is RequestState.PENDING
    # Exactly the maximum is accepted.
    request, _ = await env.alice.create_request(
        agent="db-1", action="deploy", duration=M15, reason="y" * 1024
    )
    assert request.reason == "y" * 1024


# Credentials.


async def test_no_token(env: Env) -> None:
    async with await Client.connect(env.address) as anonymous:
        with pytest.raises(AuthenticationError):
            await anonymous.list_requests()
        with pytest.raises(AuthenticationError):
            await anonymous.create_request(agent="web-1", action="deploy", duration=M15)
    assert await all_requests(env) == []


async def test_bad_token(env: Env) -> None:
    forged = TOKENS["admin"] + "x"
    async with await Client.connect(env.address, token=forged) as mallory:
        with pytest.raises(AuthenticationError) as info:
            await mallory.apply_policy(DEV_POLICY)
    assert forged not in str(info.value)
    assert (await env.admin.get_policy()).version == 1


# Reviews.


async def test_approve_by_sre_creates_the_grant(env: Env) -> None:
    request_id = await prod_request(env)
    request, grant = await env.bob.approve(request_id, reason="looks fine")
    assert request.state is RequestState.APPROVED
    assert request.decided_by == "bob"
    assert [(r.reviewer, r.decision) for r in request.reviews] == [("bob", ReviewDecision.APPROVE)]
    assert grant is not None
    assert (grant.agent, grant.subject, grant.grant_seq) == ("db-1", "alice", 1)
    assert grant.state is GrantState.PENDING_DELIVERY
    assert request.grant_id == grant.id
    assert request.grant_state is GrantState.PENDING_DELIVERY
    with pytest.raises(ConflictError):
        await env.carol.approve(request_id)
    assert len(await env.admin.list_grants()) == 1


@pytest.mark.parametrize("variant", ["Alice", "ALICE", "alice"])
async def test_nobody_approves_their_own_request(env: Env, variant: str) -> None:
    # The same person under another spelling, in the approvers' group.
    token = f"jmt_variant_{variant}_0123456789"
    groups = ["developers", "sre"] if variant == "alice" else ["sre"]
    await env.coordinator.identity.ensure_user(variant, groups, token)
    request_id = await prod_request(env)
    async with await Client.connect(env.address, token=token) as same:
        with pytest.raises(PermissionDeniedError, match="own request"):
            await same.approve(request_id)
        with pytest.raises(PermissionDeniedError, match="own request"):
            await same.deny(request_id)
    request = await env.bob.get_request(request_id)
    assert request.state is RequestState.PENDING
    assert request.reviews == ()


@pytest.mark.parametrize("reviewer", ["dave", "admin"])
async def test_approver_outside_the_group_is_refused(env: Env, reviewer: str) -> None:
    request_id = await prod_request(env)
    with pytest.raises(PermissionDeniedError, match="sre"):
        await env.clients[reviewer].approve(request_id)
    with pytest.raises(PermissionDeniedError):
        await env.clients[reviewer].deny(request_id)
    request = await env.bob.get_request(request_id)
    assert request.state is RequestState.PENDING
    assert request.reviews == ()


async def test_deny_then_approve_conflicts(env: Env) -> None:
    request_id = await prod_request(env)
    denied = await env.bob.deny(request_id, reason="not now")
    assert denied.state is RequestState.DENIED
    assert denied.decision_reason == "not now"
    with pytest.raises(ConflictError):
        await env.carol.approve(request_id)
    assert (await env.alice.get_request(request_id)).state is RequestState.DENIED
    assert await env.admin.list_grants() == []


async def test_deny_wins_over_earlier_approvals(env: Env) -> None:
    two = DEV_POLICY.replace(
        "approval: {approvals: 1, from_groups: [sre]}\n  - name: sre-prod",
        "approval: {approvals: 2, from_groups: [sre]}\n  - name: sre-prod",
    )
    assert two != DEV_POLICY
    await env.admin.apply_policy(two)
    await env.coordinator.identity.ensure_user("erin", ["sre"], "jmt_erin_0123456789abcdef")
    request_id = await prod_request(env)
    request, grant = await env.bob.approve(request_id)
    assert (request.state, grant) == (RequestState.PENDING, None)
    with pytest.raises(ConflictError, match="already reviewed"):
        await env.bob.approve(request_id)
    denied = await env.carol.deny(request_id)
    assert denied.state is RequestState.DENIED
    assert await env.admin.list_grants() == []
    async with await Client.connect(env.address, token="jmt_erin_0123456789abcdef") as erin:
        with pytest.raises(ConflictError):
            await erin.approve(request_id)


async def test_a_review_answers_the_request_as_stored(env: Env) -> None:
    # The answer is built, not read back after the commit: it must equal a read.
    def same(answered: Request, stored: Request) -> None:
        # The grant may have been applied between the answer and the read.
        assert replace(answered, grant_state=None) == replace(stored, grant_state=None)

    two = DEV_POLICY.replace(
        "approval: {approvals: 1, from_groups: [sre]}\n  - name: sre-prod",
        "approval: {approvals: 2, from_groups: [sre]}\n  - name: sre-prod",
    )
    await env.admin.apply_policy(two)
    await env.coordinator.identity.ensure_user("erin", ["sre"], "jmt_erin_0123456789abcdef")
    denied_id, approved_id = await prod_request(env), await prod_request(env, "release 43")
    pending, _ = await env.bob.approve(denied_id, reason="first look")
    assert pending.state is RequestState.PENDING
    assert pending.current_stage == 0
    same(pending, await env.alice.get_request(denied_id))
    denied = await env.carol.deny(denied_id, reason="not now")
    same(denied, await env.alice.get_request(denied_id))
    await env.bob.approve(approved_id)
    async with await Client.connect(env.address, token="jmt_erin_0123456789abcdef") as erin:
        approved, grant = await erin.approve(approved_id, reason="second look")
    assert grant is not None
    assert approved.grant_state is GrantState.PENDING_DELIVERY
    same(approved, await env.alice.get_request(approved_id))


async def test_concurrent_approve_and_deny(env: Env) -> None:
    for _ in range(5):
        request_id = await prod_request(env)
        approve, deny = await asyncio.gather(
            env.bob.approve(request_id), env.carol.deny(request_id), return_exceptions=True
        )
        outcomes = [not isinstance(x, BaseException) for x in (approve, deny)]
        assert outcomes.count(True) == 1
        loser = deny if outcomes[0] else approve
        assert isinstance(loser, ConflictError)
        final = await env.alice.get_request(request_id)
        if outcomes[0]:
            assert final.state is RequestState.APPROVED
            assert final.grant_id
        else:
            assert final.state is RequestState.DENIED
            assert final.grant_id == ""
        if final.grant_id:
            # Ended, so that the next request asks again instead of reusing this grant.
            await env.admin.revoke_grant(final.grant_id)
    grants = await env.admin.list_grants()
    approved = await env.admin.list_requests(states=[RequestState.APPROVED])
    assert sorted(g.request_id for g in grants) == sorted(r.id for r in approved)


async def test_cancel_by_requester(env: Env) -> None:
    request_id = await prod_request(env)
    with pytest.raises(PermissionDeniedError):
        await env.bob.cancel(request_id)
    cancelled = await env.alice.cancel(request_id)
    assert cancelled.state is RequestState.CANCELLED
    assert cancelled.decided_by == "alice"
    with pytest.raises(ConflictError):
        await env.bob.approve(request_id)
    with pytest.raises(ConflictError):
        await env.alice.cancel(request_id)
    other = await prod_request(env)
    assert (await env.admin.cancel(other)).state is RequestState.CANCELLED
    assert "request.cancelled" in await audit_kinds(env, request_id=request_id)


async def test_unknown_request(env: Env) -> None:
    with pytest.raises(NotFoundError):
        await env.bob.approve("req-" + "0" * 32)
    with pytest.raises(NotFoundError):
        await env.alice.get_request("req-" + "0" * 32)


# Policy.


async def test_non_admin_cannot_apply_policy(env: Env) -> None:
    with pytest.raises(PermissionDeniedError):
        await env.bob.apply_policy(DEV_POLICY.replace("max_duration: 4h", "max_duration: 40h"))
    assert (await env.admin.get_policy()).version == 1


async def test_malformed_policy_names_the_place_and_changes_nothing(env: Env) -> None:
    before = await env.admin.get_policy()
    broken = DEV_POLICY.replace("max_duration: 4h", "max_duration: forever")
    with pytest.raises(InvalidArgumentError, match=r"rules\[2\]\.max_duration"):
        await env.admin.apply_policy(broken)
    with pytest.raises(InvalidArgumentError, match="line 3"):
        await env.admin.apply_policy("version: 1\nactions: [deploy\nrules: [}\n")
    after = await env.admin.get_policy()
    assert (after.version, after.sha256) == (before.version, before.sha256)
    # The running policy is still the old one.
    _, grant = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
    assert grant is not None
    assert await audit_kinds(env, kind="policy.applied") == ["policy.applied"]


async def test_applied_policy_takes_effect(env: Env) -> None:
    locked = DEV_POLICY.replace("approval: auto", "approval: {from_groups: [sre]}")
    doc = await env.admin.apply_policy(locked, expected_version=1)
    assert (doc.version, doc.applied_by) == (2, "admin")
    with pytest.raises(ConflictError):
        await env.admin.apply_policy(DEV_POLICY, expected_version=1)
    request, grant = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
    assert (request.state, grant) == (RequestState.PENDING, None)
    assert (await env.bob.get_policy()).yaml == locked


async def test_policy_test_explains(env: Env) -> None:
    decision = await env.bob.test_policy(subject="alice", action="deploy", agent="db-1")
    assert decision.allowed
    assert decision.rule == "prod-with-approval"
    assert decision.explanation == "allowed by rule prod-with-approval"
    assert decision.approval_required
    assert decision.approver_groups == ("sre",)
    assert decision.reason_required
    assert decision.trace[0] == "staging-self-service (allow): no match on agent"
    denied = await env.bob.test_policy(subject="bob", action="deploy", agent="web-1")
    assert not denied.allowed
    assert denied.rule == ""
    assert "default deny" in denied.explanation
    too_long = await env.bob.test_policy(
        subject="alice", action="deploy", agent="web-1", duration=timedelta(hours=2)
    )
    assert not too_long.allowed
    assert "maximum duration is 1h" in too_long.explanation
    as_sre = await env.bob.test_policy(
        subject="alice", action="shell", agent="db-1", groups=["sre"]
    )
    assert as_sre.rule == "sre-prod"
    with pytest.raises(NotFoundError):
        await env.bob.test_policy(subject="alice", action="deploy", agent="nope-1")
    assert await all_requests(env) == []


# Ending grants: expiry, revoke, release.


async def test_grant_expires_at_not_after(env: Env) -> None:
    request_id, grant_id = await staging_grant(env)
    assert await env.coordinator.expirer.sweep(env.clock.now()) == (0, 0)
    await env.clock.advance(M15 - timedelta(milliseconds=1))
    assert await env.coordinator.expirer.sweep(env.clock.now()) == (0, 0)
    await env.clock.advance(timedelta(milliseconds=1))
    assert await env.coordinator.expirer.sweep(env.clock.now()) == (1, 0)
    grant = await env.alice.get_grant(grant_id)
    assert grant.state is GrantState.EXPIRED
    assert grant.ended_at == T0 + M15
    events = await env.admin.list_audit(kind="grant.expired")
    assert [(e.grant_id, e.request_id, e.details["was"]) for e in events] == [
        (grant_id, request_id, "PENDING_DELIVERY")
    ]
    assert await env.coordinator.expirer.sweep(env.clock.now()) == (0, 0)
    with pytest.raises(ConflictError):
        await env.admin.revoke_grant(grant_id)


async def test_expiry_loop_expires_grants(env: Env) -> None:
    async with running(env.coordinator):
        request_id, grant_id = await staging_grant(env)
        await env.clock.advance(M15 + timedelta(seconds=1))
        # The fake clock wakes the loop's nap; the explicit nudge covers a loop that read the
        # clock just before the advance and has not started its nap yet.
        env.coordinator.expirer.deadlines_changed()
        request = await env.wait_grant_state(request_id, GrantState.EXPIRED)
        assert request.grant_state is GrantState.EXPIRED
        assert await audit_kinds(env, kind="grant.expired", grant_id=grant_id) == ["grant.expired"]


async def test_pending_request_expires_after_its_ttl(env: Env) -> None:
    request_id = await prod_request(env)
    await env.clock.advance(timedelta(minutes=59))
    assert await env.coordinator.expirer.sweep(env.clock.now()) == (0, 0)
    await env.clock.advance(timedelta(minutes=1))
    assert await env.coordinator.expirer.sweep(env.clock.now()) == (0, 1)
    request = await env.alice.get_request(request_id)
    assert request.state is RequestState.EXPIRED
    assert request.decided_by == "coordinator"
    assert "request.expired" in await audit_kinds(env, request_id=request_id)
    with pytest.raises(ConflictError):
        await env.bob.approve(request_id)


async def test_revoke_by_admin(env: Env) -> None:
    request_id, grant_id = await staging_grant(env)
    with pytest.raises(PermissionDeniedError):
        await env.bob.revoke_grant(grant_id)  # no approver of an auto-approved grant
    with pytest.raises(PermissionDeniedError):
        await env.alice.revoke_grant(grant_id)
    grant = await env.admin.revoke_grant(grant_id, reason="incident 7")
    assert grant.state is GrantState.REVOKING
    assert grant.revoke_seq > grant.grant_seq > 0
    assert (grant.ended_by, grant.end_reason) == ("admin", "incident 7")
    again = await env.admin.revoke_grant(grant_id)
    assert (again.state, again.revoke_seq) == (GrantState.REVOKING, grant.revoke_seq)
    commands = await env.coordinator.store.commands_after("web-1", 0, 10)
    assert [(c.seq, c.kind.value, c.grant_id) for c in commands] == [
        (grant.grant_seq, "grant", grant_id),
        (grant.revoke_seq, "revoke", grant_id),
    ]
    events = await env.admin.list_audit(grant_id=grant_id, kind="grant.revoking")
    assert [(e.actor, e.details["reason"]) for e in events] == [("admin", "incident 7")]
    assert (await env.alice.get_request(request_id)).grant_state is GrantState.REVOKING


async def test_approver_may_revoke_what_their_group_approved(env: Env) -> None:
    request_id = await prod_request(env)
    _, grant = await env.bob.approve(request_id)
    assert grant is not None
    revoked = await env.carol.revoke_grant(grant.id)
    assert revoked.state is GrantState.REVOKING


async def test_release_by_subject(env: Env) -> None:
    _, grant_id = await staging_grant(env)
    with pytest.raises(PermissionDeniedError):
        await env.dave.release_grant(grant_id)
    released = await env.alice.release_grant(grant_id)
    assert released.state is GrantState.REVOKING
    assert released.end_reason == "released"
    assert released.revoke_seq == 2
    commands = await env.coordinator.store.commands_after("web-1", 1, 10)
    assert [(c.kind.value, c.revoke_reason) for c in commands] == [("revoke", "released")]
    assert await audit_kinds(env, kind="grant.releasing") == ["grant.releasing"]


async def test_unknown_grant(env: Env) -> None:
    with pytest.raises(NotFoundError):
        await env.admin.revoke_grant("grt-" + "0" * 32)
    with pytest.raises(NotFoundError):
        await env.alice.release_grant("grt-" + "0" * 32)


async def test_removing_an_agent_never_reports_its_grants_as_revoked(env: Env) -> None:
    _, grant_id = await staging_grant(env)
    with pytest.raises(PermissionDeniedError):
        await env.alice.remove_agent("web-1")
    await env.admin.remove_agent("web-1")
    grant = await env.admin.get_grant(grant_id)
    assert grant.state is GrantState.REVOKE_FAILED
    assert "agent removed" in grant.failure
    assert [a.name for a in await env.admin.list_agents()] == ["db-1"]
    with pytest.raises(NotFoundError):
        await env.alice.create_request(agent="web-1", action="deploy", duration=M15)


# Audit.


async def test_audit_chain_verifies_after_a_busy_day(env: Env) -> None:
    pending = await prod_request(env)
    _, approved = await env.bob.approve(pending)
    assert approved is not None
    # Ended (never confirmed by the agent: it ends as EXPIRED), so the next requests ask again
    # instead of reusing it.
    await env.admin.revoke_grant(approved.id)
    await env.bob.deny(await prod_request(env))
    await env.alice.cancel(await prod_request(env))
    _, revoked = await staging_grant(env)
    await env.admin.revoke_grant(revoked)
    _, released = await staging_grant(env)
    await env.alice.release_grant(released)
    await staging_grant(env, timedelta(minutes=1))
    await prod_request(env)
    await env.clock.advance(timedelta(hours=2))
    # Every grant ends by then: the approved one, the two on their way out (a revoke the agent
    # never confirmed ends as EXPIRED), and the short one; one request was still pending.
    assert await env.coordinator.expirer.sweep(env.clock.now()) == (4, 1)
    with pytest.raises(PermissionDeniedError):
        await env.bob.create_request(agent="web-1", action="deploy", duration=M15)
    await env.admin.apply_policy(DEV_POLICY + "\n# v2\n")

    events = await env.admin.list_audit()
    result = await env.admin.verify_audit()
    assert result.ok, result.problem
    assert result.events_checked == len(events)
    assert result.head_hash == events[-1].hash
    assert [e.seq for e in events] == list(range(1, len(events) + 1))

    # Filters.
    on_db = await env.admin.list_audit(agent="db-1")
    assert on_db
    assert all(e.agent == "db-1" for e in on_db)
    assert {e.kind for e in on_db} >= {"request.created", "request.denied", "request.expired"}
    by_alice = await env.admin.list_audit(subject="alice")
    assert by_alice
    assert all(e.subject == "alice" for e in by_alice)
    assert not any(e.subject == "bob" for e in by_alice)
    assert len(on_db) < len(events)
    assert await env.admin.list_audit(subject="bob", kind="request.refused")


async def test_audit_verify_names_a_tampered_entry(env: Env) -> None:
    await staging_grant(env)
    # Behind the coordinator's back.
    raw_sql(
        env.coordinator.config.data_dir / "coordinator.db",
        "UPDATE audit SET actor = 'mallory' WHERE seq = 3",
    )
    result = await env.admin.verify_audit()
    assert not result.ok
    assert result.first_bad_seq == 3
    assert result.events_checked == 2


async def test_audit_pages_never_end_early(env: Env) -> None:
    async with env.coordinator.store.transaction() as tx:
        for i in range(5100):
            await tx.audit(
                AuditEntry(ObservedKind("test.bulk"), "admin", T0, details={"i": str(i)})
            )
    async with channel(env.address) as ch:
        stub = audit_pb2_grpc.AuditStub(ch)
        first = await stub.ListEvents(
            audit_pb2.ListEventsRequest(page_size=6000), metadata=bearer(TOKENS["admin"])
        )
        assert len(first.events) == 5000
        assert first.next_page_token == str(first.events[-1].seq)
        rest = await stub.ListEvents(
            audit_pb2.ListEventsRequest(page_size=6000, page_token=first.next_page_token),
            metadata=bearer(TOKENS["admin"]),
        )
    total = len(await env.admin.list_audit())
    assert len(first.events) + len(rest.events) == total
    assert rest.next_page_token == ""


async def test_watch_sees_the_approval(env: Env) -> None:
    request_id = await prod_request(env)

    async def approve_later() -> None:
        await env.bob.approve(request_id)

    async with asyncio.timeout(WAIT), asyncio.TaskGroup() as tg:
        waiter = tg.create_task(
            env.alice.wait_for_request(
                request_id, until=lambda r: r.state is not RequestState.PENDING, timeout=WAIT
            )
        )
        tg.create_task(approve_later())
    assert waiter.result().state is RequestState.APPROVED
