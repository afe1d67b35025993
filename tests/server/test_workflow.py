"""The approval workflow end to end through the SDK against a real coordinator (gRPC on port 0,
SQLite in a temporary directory, a fake clock): staged quorums, pinned plans, membership at the
moment of approving, policy versions denying pending requests, budgets, windows and tickets."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from jitmesh.client import Client
from jitmesh.errors import ConflictError, InvalidArgumentError, PermissionDeniedError
from jitmesh.types import RequestState
from server.domain.access import AccessService
from server.domain.models import Principal
from server.domain.policy import DEV_POLICY
from tests.server.helpers import Env

M15 = timedelta(minutes=15)

STAGED = """\
version: 2
actions: [deploy, restart, logs]
request_ttl: 1h
rules:
  - name: prod
    subjects: {groups: [developers]}
    actions: [deploy]
    agents: {labels: {env: prod}}
    max_duration: 2h
    reason: required
    pending_ttl: 30m
    approval:
      stages:
        - {name: team, approvals: 2, groups: [sre], timeout: 10m, escalate_to: [oncall]}
        - {name: security, groups: [security]}
  - name: staging
    subjects: {groups: [developers]}
    actions: [deploy]
    agents: {labels: {env: staging}}
    max_duration: 1h
    approval:
      auto:
        windows: ["weekdays 08:00-20:00 Europe/Berlin"]
        budget: {count: 2, granted: 40m}
      stages:
        - {groups: [sre]}
"""

EXTRA = {"erin": ["security"], "olga": ["oncall"], "sam": ["sre"]}


async def more_users(env: Env) -> dict[str, Client]:
    out = {}
    for name, groups in EXTRA.items():
        token = f"jmt_test_{name}_0123456789abcdef"
        await env.coordinator.identity.ensure_user(name, groups, token)
        out[name] = await Client.connect(env.address, token=token, timeout=10.0)
    return out


async def staged(env: Env) -> dict[str, Client]:
    await env.admin.apply_policy(STAGED)
    return await more_users(env)


async def prod(env: Env) -> str:
    request, grant = await env.alice.create_request(
        agent="db-1", action="deploy", duration=M15, reason="migration"
    )
    assert grant is None
    return request.id


def access(env: Env) -> AccessService:
    assert env.coordinator.access is not None
    return env.coordinator.access


ALICE = Principal("alice", frozenset({"developers"}))


async def test_request_pins_its_plan_and_ticket(env: Env) -> None:
    users = await staged(env)
    try:
        await env.admin.apply_policy(
            STAGED.replace(
                "    pending_ttl: 30m", "    pending_ttl: 30m\n    ticket: '^(INC|CHG)-[0-9]+$'"
            )
        )
        before = await env.admin.list_requests()
        for ticket in ("JIRA-1", "", "INC-7 "):
            with pytest.raises(InvalidArgumentError, match="ticket id matching"):
                await env.alice.create_request(
                    agent="db-1", action="deploy", duration=M15, reason="x", ticket=ticket
                )
        assert await env.admin.list_requests() == before
        created, _ = await env.alice.create_request(
            agent="db-1", action="deploy", duration=M15, reason="x", ticket="INC-7"
        )
        request = await env.bob.get_request(created.id)
        assert request == created
        assert request.ticket == "INC-7"
        assert request.plan is not None
        assert request.plan.rule == "prod"
        assert request.plan.policy_version == 3
        assert request.plan.ticket_pattern == "^(INC|CHG)-[0-9]+$"
        assert request.plan.reason_required
        assert not request.plan.automatic
        assert [(s.name, s.approvals, s.groups) for s in request.stages] == [
            ("team", 2, ("sre",)),
            ("security", 1, ("security",)),
        ]
        assert request.pending_expires_at == request.created_at + timedelta(minutes=30)
        events = await env.admin.list_audit(kind="request.created", request_id=request.id)
        assert events[0].details["ticket"] == "INC-7"
        assert events[0].details["policy_version"] == "3"
        decision = await env.admin.test_policy(subject="alice", action="deploy", agent="db-1")
        assert decision.plan is not None
        assert decision.plan.stages == request.stages
        assert decision.policy_version == 3
    finally:
        for c in users.values():
            await c.close()


async def test_reviewable_lists_what_the_caller_may_approve_now(env: Env) -> None:
    users = await staged(env)
    try:
        request_id = await prod(env)
        assert [r.id for r in await env.bob.list_requests(reviewable=True)] == [request_id]
        assert await users["erin"].list_requests(reviewable=True) == []  # stage 2 not yet
        assert await env.alice.list_requests(reviewable=True) == []  # own request
        await env.bob.approve(request_id)
        assert await env.bob.list_requests(reviewable=True) == []  # reviewed already
        assert [r.id for r in await env.carol.list_requests(reviewable=True)] == [request_id]
        request, _ = await env.carol.approve(request_id)
        assert request.current_stage == 1
        assert [r.stage for r in request.reviews] == [0, 0]
        assert [r.id for r in await users["erin"].list_requests(reviewable=True)] == [request_id]
        assert await users["olga"].list_requests(reviewable=True) == []
    finally:
        for c in users.values():
            await c.close()


async def test_two_stages_in_order_then_a_grant(env: Env) -> None:
    users = await staged(env)
    try:
        request_id = await prod(env)
        with pytest.raises(PermissionDeniedError, match="has not started"):
            await users["erin"].approve(request_id)
        request, grant = await env.bob.approve(request_id)
        assert (request.state, grant) == (RequestState.PENDING, None)
        request, grant = await env.carol.approve(request_id)
        assert (request.state, grant) == (RequestState.PENDING, None)
        with pytest.raises(PermissionDeniedError, match="stage security"):
            await users["sam"].approve(request_id)
        request, grant = await users["erin"].approve(request_id)
        assert request.state is RequestState.APPROVED
        assert grant is not None
        assert request.decided_by == "erin"
        reviewed = await env.admin.list_audit(kind="request.reviewed", request_id=request_id)
        assert [e.details.get("stage") for e in reviewed] == ["team", "team", "security"]
    finally:
        for c in users.values():
            await c.close()


async def test_two_stage_quorum_with_concurrent_approve_and_deny(env: Env) -> None:
    users = await staged(env)
    try:
        for _ in range(4):
            request_id = await prod(env)
            await env.bob.approve(request_id)
            approve, deny = await asyncio.gather(
                env.carol.approve(request_id),
                users["erin"].deny(request_id, reason="no"),
                return_exceptions=True,
            )
            final = await env.alice.get_request(request_id)
            # Deny wins whichever commits first: a deny from the later stage's approver ends
            # the request even after the first stage passed.
            assert final.state is RequestState.DENIED, (approve, deny)
            assert final.decided_by == "erin"
            assert final.grant_id == ""
        assert await env.admin.list_grants() == []
    finally:
        for c in users.values():
            await c.close()


async def test_escalation_after_the_stage_timeout(env: Env) -> None:
    users = await staged(env)
    try:
        request_id = await prod(env)
        await env.bob.approve(request_id)
        with pytest.raises(PermissionDeniedError, match="needs approval from group sre"):
            await users["olga"].approve(request_id)
        await env.clock.advance(timedelta(minutes=10))
        request, _ = await users["olga"].approve(request_id)
        assert [r.reviewer for r in request.reviews] == ["bob", "olga"]
        request, grant = await users["erin"].approve(request_id)
        assert request.state is RequestState.APPROVED
        assert grant is not None
    finally:
        for c in users.values():
            await c.close()


async def test_an_approver_who_left_the_pinned_group_is_refused(env: Env) -> None:
    users = await staged(env)
    try:
        request_id = await prod(env)
        await env.bob.approve(request_id)
        # carol leaves sre: her token stays valid, but she no longer approves this request.
        await env.coordinator.identity.ensure_user(
            "carol", ["developers"], "jmt_carol_new_0123456789"
        )
        with pytest.raises(PermissionDeniedError, match="group sre"):
            await env.carol.approve(request_id)
        request = await access(env).get_request(ALICE, request_id)
        assert [r.reviewer for r in request.reviews] == ["bob"]
        assert request.reviews[0].groups == ("sre",)
    finally:
        for c in users.values():
            await c.close()


async def test_a_new_policy_version_denies_pending_requests_it_would_deny(env: Env) -> None:
    users = await staged(env)
    try:
        kept = await prod(env)
        other = await prod(env)
        doc = await env.admin.apply_policy(STAGED.replace("max_duration: 2h", "max_duration: 10m"))
        for request_id in (kept, other):
            request = await env.alice.get_request(request_id)
            assert request.state is RequestState.DENIED
            assert request.decided_by == f"policy:v{doc.version}"
            assert "allows at most 10m" in request.decision_reason
        denied = await env.admin.list_audit(kind="request.denied", request_id=kept)
        assert denied[0].actor == f"policy:v{doc.version}"
        # A version that still allows the request leaves it pending, with its pinned plan.
        await env.admin.apply_policy(STAGED)
        again = await prod(env)
        await env.admin.apply_policy(STAGED.replace("approvals: 2", "approvals: 3"))
        request = await access(env).get_request(ALICE, again)
        assert request.state is RequestState.PENDING
        assert request.stages[0].approvals == 2
    finally:
        for c in users.values():
            await c.close()


async def test_auto_approval_budget_runs_out_then_a_person_decides(env: Env) -> None:
    users = await staged(env)
    try:
        # 2026-01-05 is a Monday; 09:00 UTC is 10:00 in Berlin, inside the window.
        await env.clock.advance(timedelta(days=4, hours=9))
        first, g1 = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
        assert first.state is RequestState.APPROVED
        assert g1 is not None
        second, _ = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
        assert second.state is RequestState.APPROVED
        # Count 2 used up: the third waits for a person.
        third, g3 = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
        assert (third.state, g3) == (RequestState.PENDING, None)
        # Another user has a budget of their own.
        other, _ = await env.dave.create_request(agent="web-1", action="deploy", duration=M15)
        assert other.state is RequestState.APPROVED
        # 24 hours later the window rolls on.
        await env.clock.advance(timedelta(hours=24))
        fourth, _ = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
        assert fourth.state is RequestState.APPROVED
        # Granted time: 40m in 24h; 15m used, a 30m request exceeds it.
        over, _ = await env.alice.create_request(
            agent="web-1", action="deploy", duration=timedelta(minutes=30)
        )
        assert over.state is RequestState.PENDING
        approved, grant = await env.bob.approve(over.id)
        assert approved.state is RequestState.APPROVED
        assert grant is not None
    finally:
        for c in users.values():
            await c.close()


async def test_auto_approval_only_inside_its_time_window(env: Env) -> None:
    users = await staged(env)
    try:
        # 2026-01-03 is a Saturday.
        await env.clock.advance(timedelta(days=2, hours=10))
        weekend, _ = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
        assert weekend.state is RequestState.PENDING
        # Monday 18:30 UTC is 19:30 in Berlin: open; 19:30 UTC is 20:30: closed.
        await env.clock.advance(timedelta(days=2, hours=8, minutes=30))
        inside, _ = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
        assert inside.state is RequestState.APPROVED
        decision = await env.admin.test_policy(subject="alice", action="deploy", agent="web-1")
        assert any("open now" in line for line in decision.trace), decision.trace
        assert any("budget: 1 of 2 automatic grants" in line for line in decision.trace)
        await env.clock.advance(timedelta(hours=1))
        late, _ = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
        assert late.state is RequestState.PENDING
        decision = await env.admin.test_policy(subject="alice", action="deploy", agent="web-1")
        assert any("closed now" in line for line in decision.trace)
    finally:
        for c in users.values():
            await c.close()


async def test_version_1_policy_keeps_working(env: Env) -> None:
    # The fixture's policy is DEV_POLICY, a version-1 document.
    assert "version: 1" in DEV_POLICY
    request, _ = await env.alice.create_request(
        agent="db-1", action="deploy", duration=M15, reason="x"
    )
    assert request.approver_groups == ("sre",)
    approved, grant = await env.bob.approve(request.id)
    assert approved.state is RequestState.APPROVED
    assert grant is not None
    with pytest.raises(ConflictError):
        await env.carol.approve(request.id)
