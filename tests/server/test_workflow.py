"""The approval workflow end to end through the SDK against a real coordinator (gRPC on port 0,
SQLite in a temporary directory, a fake clock): staged quorums, pinned plans, membership at the
moment of approving, policy versions denying pending requests, budgets, windows and tickets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, timedelta
from typing import Any

import pytest

from jitmesh.client import Client
from jitmesh.clock import rfc3339
from jitmesh.errors import (
    ConflictError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from jitmesh.types import Grant, GrantState, RequestState
from server.domain.access import AccessService
from server.domain.models import Principal
from server.domain.policy import DEV_POLICY
from tests.server.helpers import ADMIN, WAIT, Env, agent_link

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

    async def ask(client: Client, duration: timedelta = M15) -> tuple[RequestState, bool]:
        """A request, its state, and whether a grant came with it (released at once, so the
        next request is not answered by reusing it)."""
        request, grant = await client.create_request(
            agent="web-1", action="deploy", duration=duration
        )
        if grant is not None:
            await client.release_grant(grant.id)
        return request.state, grant is not None

    try:
        # 2026-01-05 is a Monday; 09:00 UTC is 10:00 in Berlin, inside the window.
        await env.clock.advance(timedelta(days=4, hours=9))
        assert await ask(env.alice) == (RequestState.APPROVED, True)
        assert await ask(env.alice) == (RequestState.APPROVED, True)
        # Count 2 used up: the third waits for a person.
        assert await ask(env.alice) == (RequestState.PENDING, False)
        # Another user has a budget of their own.
        assert await ask(env.dave) == (RequestState.APPROVED, True)
        # 24 hours later the window rolls on.
        await env.clock.advance(timedelta(hours=24))
        assert await ask(env.alice) == (RequestState.APPROVED, True)
        # Granted time: 40m in 24h; 15m used, a 30m request exceeds it and waits for a person.
        over, _ = await env.alice.create_request(
            agent="web-1", action="deploy", duration=timedelta(minutes=30)
        )
        assert over.state is RequestState.PENDING
        approved, grant = await env.bob.approve(over.id)
        assert approved.state is RequestState.APPROVED
        assert grant is not None
        decision = await env.admin.test_policy(subject="alice", action="deploy", agent="web-1")
        assert any("budget: 1 of 2 automatic grants" in line for line in decision.trace)
    finally:
        for c in users.values():
            await c.close()


async def test_concurrent_requests_never_both_fit_a_budget_of_one(env: Env) -> None:
    await env.admin.apply_policy(
        STAGED.replace("budget: {count: 2, granted: 40m}", "budget: {count: 1}")
    )
    users = await more_users(env)
    try:
        await env.clock.advance(timedelta(days=4, hours=9))  # Monday, inside the window
        made = await asyncio.gather(
            *(
                env.alice.create_request(agent="web-1", action="deploy", duration=M15)
                for _ in range(6)
            )
        )
        states = sorted(r.request.state.value for r in made)
        assert states == ["APPROVED"] + ["PENDING"] * 5
        assert sum(r.grant is not None for r in made) == 1
        assert len(await env.admin.list_audit(kind="grant.created")) == 1
        # The ones that did not fit wait for people, with the rule's stages pinned.
        waiting = [r.request for r in made if r.grant is None]
        assert all(r.approvals_required == 1 and r.plan is not None for r in waiting)
        assert all(r.plan is not None and not r.plan.automatic for r in waiting)
    finally:
        for c in users.values():
            await c.close()


async def test_only_a_grant_people_approved_is_reused(env: Env) -> None:
    users = await staged(env)
    try:
        await env.clock.advance(timedelta(days=4, hours=9))  # Monday, inside the window
        grants = []
        for _ in range(2):
            request, grant = await env.alice.create_request(
                agent="web-1", action="deploy", duration=M15
            )
            assert request.state is RequestState.APPROVED
            assert grant is not None
            grants.append(grant.id)
        # The budget is used up and both automatic grants are still live: the next request
        # waits for a person (an automatic grant answered nobody, so it is never reused).
        waiting = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
        assert not waiting.reused
        assert (waiting.request.state, waiting.grant) == (RequestState.PENDING, None)
        options = await env.alice.request_options(agent="web-1")
        assert [o.live_grant_id for o in options if o.action == "deploy"] == [""]
        _, approved = await env.bob.approve(waiting.request.id)
        assert approved is not None
        # A grant a person approved is reused by the next request.
        again = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
        assert again.reused
        assert again.grant is not None
        assert again.grant.id == approved.id
        assert approved.id not in grants
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


# Extension in place, reuse of a live grant, and the expiring notice.

EXTENDING = """\
version: 2
actions: [deploy, restart, logs]
rules:
  - name: staging
    subjects: {groups: [developers]}
    actions: [deploy]
    agents: {labels: {env: staging}}
    max_duration: 1h
    approval: auto
    extend: {max_count: 2, max_total: 1h}
  - name: prod
    subjects: {groups: [developers]}
    actions: [deploy]
    agents: {labels: {env: prod}}
    max_duration: 1h
    approval: {stages: [{groups: [sre]}]}
    extend: {approval: again}
"""


async def test_extension_moves_the_end_in_place_and_audits_it_once(env: Env) -> None:
    await env.admin.apply_policy(EXTENDING)
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        await link.hello("web-1")
        _, grant = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
        assert grant is not None
        seq, _ = await link.command()
        await link.ack(seq, grant.id)
        await env.wait_grant_state(grant.request_id, GrantState.ACTIVE)
        await env.clock.advance(timedelta(minutes=5))
        extended, pending = await env.alice.extend_grant(grant.id, by=M15, reason="still going")
        assert pending is None
        assert extended.id == grant.id
        assert extended.not_after == grant.not_after + M15
        assert (extended.extensions, extended.original_not_after) == (1, grant.not_after)
        assert extended.state is GrantState.ACTIVE
        # The agent gets the same grant with its new end, under a new sequence number.
        seq2, body2 = await link.command()
        assert seq2 == seq + 1
        assert body2.grant.grant_id == grant.id
        assert body2.grant.not_after.ToDatetime(tzinfo=UTC) == extended.not_after
        await link.ack(seq2, grant.id)
        kinds = await audit_kinds_until(env, grant.id, "grant.extension_applied")
        assert "grant.extension_failed" not in kinds
        assert kinds.count("grant.applied") == 1
        assert kinds.count("grant.extended") == 1
        (event,) = await env.admin.list_audit(kind="grant.extended", grant_id=grant.id)
        assert (event.actor, event.details["by"], event.details["extension"]) == (
            "alice",
            "15m",
            "1",
        )
        # Bounds: 1h in all from the start (30m used), at most two extensions.
        with pytest.raises(PermissionDeniedError, match="at most 1h in all"):
            await env.alice.extend_grant(grant.id, by=timedelta(minutes=31))
        await env.alice.extend_grant(grant.id, by=timedelta(minutes=10))
        with pytest.raises(PermissionDeniedError, match="at most 2 extension"):
            await env.alice.extend_grant(grant.id, by=timedelta(minutes=1))
        with pytest.raises(PermissionDeniedError, match="subject"):
            await env.dave.extend_grant(grant.id, by=timedelta(minutes=1))
        # The coordinator expires it at the new end, not the first one.
        await env.clock.advance(timedelta(minutes=30))
        await env.coordinator.expirer.sweep(env.clock.now())
        assert (await env.alice.get_grant(grant.id)).state is GrantState.ACTIVE
        await env.clock.advance(timedelta(minutes=6))
        await env.coordinator.expirer.sweep(env.clock.now())
        assert (await env.alice.get_grant(grant.id)).state is GrantState.EXPIRED


async def test_extension_that_needs_approval_again(env: Env) -> None:
    await env.admin.apply_policy(EXTENDING)
    request, _ = await env.alice.create_request(
        agent="db-1", action="deploy", duration=M15, reason="x"
    )
    _, grant = await env.bob.approve(request.id)
    assert grant is not None
    same, pending = await env.alice.extend_grant(grant.id, by=M15, reason="more")
    assert same.not_after == grant.not_after
    assert pending is not None
    assert (pending.state, pending.extends_grant_id) == (RequestState.PENDING, grant.id)
    approved, extended = await env.carol.approve(pending.id)
    assert approved.state is RequestState.APPROVED
    assert approved.grant_id == grant.id
    assert extended is not None
    assert extended.id == grant.id
    assert extended.not_after == grant.not_after + M15
    assert len(await env.admin.list_grants()) == 1


async def test_a_request_for_what_is_held_live_reuses_the_grant(env: Env) -> None:
    # Prod needs an approver; extensions there are automatic within the rule's bounds.
    await env.admin.apply_policy(EXTENDING.replace("    extend: {approval: again}\n", ""))
    first, _ = await env.alice.create_request(
        agent="db-1", action="deploy", duration=M15, reason="x"
    )
    _, grant = await env.bob.approve(first.id)
    assert grant is not None
    again = await env.alice.create_request(agent="db-1", action="deploy", duration=M15, reason="y")
    assert again.reused
    assert again.grant is not None
    assert again.grant.id == grant.id
    assert again.request.state is RequestState.APPROVED
    assert (again.request.grant_id, again.request.decided_by) == (grant.id, "reused")
    assert await env.bob.list_requests(reviewable=True) == []  # nobody was asked
    # More time than it has left: extended in place (the rule allows it), still one grant.
    await env.clock.advance(timedelta(minutes=10))
    longer = await env.alice.create_request(agent="db-1", action="deploy", duration=M15, reason="z")
    assert longer.reused
    assert longer.grant is not None
    assert longer.grant.id == grant.id
    assert longer.grant.not_after == env.clock.now() + M15
    assert longer.grant.extensions == 1
    assert [g.id for g in await env.admin.list_grants()] == [grant.id]
    assert len(await env.admin.list_audit(kind="request.reused")) == 2
    # Someone else holds nothing: their request asks an approver.
    other, other_grant = await env.dave.create_request(
        agent="db-1", action="deploy", duration=M15, reason="x"
    )
    assert (other.reused, other.state, other_grant) == (False, RequestState.PENDING, None)
    # An automatic rule makes a grant of its own each time (overlaps are counted on the host).
    _, one = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
    two = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
    assert one is not None
    assert two.grant is not None
    assert not two.reused
    assert two.grant.id != one.id


async def test_grant_expiring_is_audited_before_the_end_and_again_after_an_extension(
    env: Env,
) -> None:
    await env.admin.apply_policy(EXTENDING)
    warner = env.coordinator.warnings
    assert warner is not None
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        await link.hello("web-1")
        _, grant = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
        assert grant is not None
        seq, _ = await link.command()
        await link.ack(seq, grant.id)
        await env.wait_grant_state(grant.request_id, GrantState.ACTIVE)
    grant_id = grant.id

    async def warnings() -> list[str]:
        await warner.warn_due(env.clock.now())  # the running loop may have done it already
        events = await env.admin.list_audit(kind="grant.expiring", grant_id=grant_id)
        return [e.details["expires_at"] for e in events]

    await env.clock.advance(timedelta(minutes=6))  # 9m left, the warning time is 10m
    assert await warnings() == [rfc3339(grant.not_after)]
    extended, _ = await env.alice.extend_grant(grant.id, by=timedelta(minutes=15))
    assert await warnings() == [rfc3339(grant.not_after)]  # once per end
    await env.clock.advance(timedelta(minutes=15))  # 9m left of the new end
    assert await warnings() == [rfc3339(grant.not_after), rfc3339(extended.not_after)]


async def audit_kinds_until(env: Env, grant_id: str, kind: str) -> list[str]:
    """The grant's audit kinds once `kind` is among them (waiting on the audit tail)."""
    async with asyncio.timeout(WAIT), contextlib.aclosing(env.admin.tail_audit()) as tail:
        async for event in tail:
            if event.grant_id == grant_id and event.kind == kind:
                break
    return [e.kind for e in await env.admin.list_audit(grant_id=grant_id)]


# The SDK's grant context manager.


@contextlib.asynccontextmanager
async def acking_agent(env: Env, name: str) -> AsyncIterator[list[int]]:
    """A raw AgentLink for `name` that acks every command as applied; yields the seqs acked."""
    acked: list[int] = []
    async with agent_link(env.address, env.credentials[name]) as link:
        await link.hello(name)

        async def ack_all() -> None:
            while True:
                seq, body = await link.command()
                grant_id = body.grant.grant_id or body.revoke.grant_id
                await link.ack(seq, grant_id)
                acked.append(seq)

        task = asyncio.create_task(ack_all())
        try:
            yield acked
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_grant_context_manager_releases_on_an_exception(env: Env) -> None:
    seen: list[Grant] = []

    async def deploy() -> None:
        async with env.alice.grant("web-1", "deploy", M15, reason="ci") as held:
            seen.append(held)
            raise RuntimeError("deploy broke")

    async with acking_agent(env, "web-1"):
        with pytest.raises(RuntimeError, match="deploy broke"):
            await deploy()
        (held,) = seen
        assert held.state is GrantState.ACTIVE
        assert held.subject == "alice"
        after = await env.alice.get_grant(held.id)
        assert after.state in (GrantState.REVOKING, GrantState.RELEASED)
        assert after.end_reason == "released"


async def test_grant_context_manager_leaves_a_reused_grant_alone(env: Env) -> None:
    async with acking_agent(env, "db-1"):
        request, _ = await env.alice.create_request(
            agent="db-1", action="deploy", duration=M15, reason="x"
        )
        _, earlier = await env.bob.approve(request.id)
        assert earlier is not None
        await env.wait_grant_state(request.id, GrantState.ACTIVE)
        async with env.alice.grant("db-1", "deploy", timedelta(minutes=5), reason="y") as held:
            assert held.id == earlier.id
        assert (await env.alice.get_grant(earlier.id)).state is GrantState.ACTIVE


async def test_grant_context_manager_denied_and_cancelled(env: Env) -> None:
    async def deny_when_asked() -> None:
        async with contextlib.aclosing(env.bob.watch_requests()) as stream:
            async for seen in stream:
                if seen.state is RequestState.PENDING and seen.subject == "alice":
                    await env.bob.deny(seen.id, reason="not today")
                    return

    denier = asyncio.create_task(deny_when_asked())

    async def use(timeout: float) -> None:
        async with env.alice.grant("db-1", "deploy", M15, reason="x", timeout=timeout):
            raise AssertionError("never entered")

    with pytest.raises(PermissionDeniedError, match="denied by bob: not today"):
        await use(10)
    await denier
    # Given up waiting: the undecided request is cancelled, not left for approvers.
    with pytest.raises(DeadlineExceededError):
        await use(0.2)
    pending = await env.alice.list_requests(states=[RequestState.PENDING])
    assert pending == []
    assert len(await env.alice.list_requests(states=[RequestState.CANCELLED])) == 1


async def test_grant_context_manager_cancels_its_request_when_the_caller_is_cancelled(
    env: Env,
) -> None:
    async def use() -> None:
        async with env.alice.grant("db-1", "deploy", M15, reason="x"):
            raise AssertionError("never entered")

    task = asyncio.create_task(use())
    async with asyncio.timeout(10):
        while not await env.alice.list_requests(states=[RequestState.PENDING]):
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await env.alice.list_requests(states=[RequestState.PENDING]) == []
    (cancelled,) = await env.alice.list_requests(states=[RequestState.CANCELLED])
    assert cancelled.decided_by == "alice"
    assert await env.bob.list_requests(reviewable=True) == []


async def test_grant_context_manager_cancelled_while_the_request_is_made(env: Env) -> None:
    """A cancellation that lands while CreateRequest is on its way: the request the
    coordinator made all the same does not stay behind for approvers."""
    started = asyncio.Event()
    original = env.alice.create_request

    async def slow_create(**kwargs: Any) -> Any:
        started.set()
        return await original(**kwargs)

    env.alice.create_request = slow_create  # type: ignore[method-assign]

    async def use() -> None:
        async with env.alice.grant("db-1", "deploy", M15, reason="x"):
            raise AssertionError("never entered")

    task = asyncio.create_task(use())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await env.alice.list_requests(states=[RequestState.PENDING]) == []
    assert len(await env.alice.list_requests(states=[RequestState.CANCELLED])) == 1


# Watching requests with a cursor.


async def test_watch_resumes_from_its_cursor_without_losing_changes(env: Env) -> None:
    seen: dict[str, list[RequestState]] = {}

    async def read(n: int, after: int) -> int:
        watch = env.admin.watch_requests(after_change_seq=after)
        async with asyncio.timeout(WAIT), contextlib.aclosing(watch) as s:
            async for request in s:
                assert request.change_seq > after
                after = request.change_seq
                seen.setdefault(request.id, []).append(request.state)
                n -= 1
                if n == 0:
                    break
        return after

    first = await prod(env)
    # From the start of the log (seq 1 is the first policy): the one request so far.
    cursor = await read(1, 1)
    assert seen == {first: [RequestState.PENDING]}
    seen.clear()
    # Disconnected: a burst of changes (more than the hub's queue would hold for a slow
    # watcher) happens meanwhile.
    made = [await prod(env) for _ in range(5)]
    await env.bob.deny(made[0], reason="no")
    await env.alice.cancel(made[1])
    _, grant = await env.bob.approve(made[2])
    assert grant is not None
    # Resumed from the cursor: every request changed since, once, in its current state.
    cursor = await read(5, cursor)
    assert set(seen) == set(made)
    assert seen[made[0]] == [RequestState.DENIED]
    assert seen[made[1]] == [RequestState.CANCELLED]
    assert seen[made[2]] == [RequestState.APPROVED]
    # And live changes after that.
    seen.clear()
    await env.bob.deny(made[3], reason="later")
    await read(1, cursor)
    assert seen == {made[3]: [RequestState.DENIED]}


# Scheduled starts.


async def test_scheduled_start_issues_the_grant_at_its_start_after_a_second_look(
    env: Env,
) -> None:
    access_ = access(env)
    start = env.clock.now() + timedelta(hours=2)
    request, grant = await env.alice.create_request(
        agent="db-1", action="deploy", duration=timedelta(hours=1), reason="x", start_at=start
    )
    assert (request.state, request.start_at, grant) == (RequestState.PENDING, start, None)
    approved, grant = await env.bob.approve(request.id)
    assert (approved.state, grant) == (RequestState.SCHEDULED, None)
    assert await env.admin.list_grants() == []
    assert await access_.start_scheduled(env.clock.now()) == 0  # not yet
    await env.clock.advance(timedelta(hours=2))
    await access_.start_scheduled(env.clock.now())  # the running loop may have done it already
    started = await env.alice.get_request(request.id)
    assert (started.state, started.decided_by) == (RequestState.APPROVED, "scheduler")
    issued = await env.alice.get_grant(started.grant_id)
    # Its duration counts from the start, not from the approval.
    assert (issued.not_before, issued.not_after) == (start, start + timedelta(hours=1))
    kinds = [e.kind for e in await env.admin.list_audit(request_id=request.id)]
    assert kinds[-2:] == ["request.approved", "grant.created"]
    assert "request.scheduled" in kinds


async def test_scheduled_start_with_eligibility_lost_in_between_gives_nothing(env: Env) -> None:
    access_ = access(env)
    start = env.clock.now() + timedelta(hours=1)
    left, _ = await env.alice.create_request(
        agent="db-1", action="deploy", duration=M15, reason="x", start_at=start
    )
    await env.bob.approve(left.id)
    locked, _ = await env.dave.create_request(
        agent="db-1", action="deploy", duration=M15, reason="x", start_at=start
    )
    await env.bob.approve(locked.id)
    cancelled, _ = await env.dave.create_request(
        agent="db-1", action="restart", duration=M15, reason="x", start_at=start
    )
    await env.bob.approve(cancelled.id)
    assert (await env.dave.cancel(cancelled.id)).state is RequestState.CANCELLED
    # Meanwhile alice leaves developers, and dave is locked.
    await env.coordinator.identity.ensure_user("alice", ["sales"], "jmt_alice_new_0123456789")
    lock, _, _ = await env.admin.create_lock(subject="dave", reason="investigation")
    await env.clock.advance(timedelta(hours=1))
    await access_.start_scheduled(env.clock.now())
    first = await env.admin.get_request(left.id)
    assert first.state is RequestState.DENIED
    assert first.decided_by.startswith("policy:v")
    assert "no longer allowed" in first.decision_reason
    second = await env.admin.get_request(locked.id)
    assert (second.state, second.decided_by) == (RequestState.DENIED, lock.id)
    assert await env.admin.list_grants() == []


# Several hosts in one request.


async def test_a_request_for_several_hosts_gets_one_approval_and_a_grant_each(env: Env) -> None:
    for name in ("db-2", "db-3"):
        join, _ = await env.coordinator.fleet.create_join_token(ADMIN, {"env": "prod"}, None)
        await env.coordinator.fleet.enroll(join, name, {})
    created = await env.alice.create_request(
        selector={"env": "prod"}, action="deploy", duration=M15, reason="fleet release"
    )
    request = created.request
    assert (request.state, request.agent, request.selector) == (
        RequestState.PENDING,
        "",
        {"env": "prod"},
    )
    approved, first = await env.bob.approve(request.id)
    assert approved.state is RequestState.APPROVED
    assert first is not None
    grants = [await env.alice.get_grant(g) for g in approved.grant_ids]
    assert sorted(g.agent for g in grants) == ["db-1", "db-2", "db-3"]
    assert approved.grant_id == grants[0].id == first.id
    assert {g.request_id for g in grants} == {request.id}
    # Each is tracked on its own: revoking one leaves the others.
    await env.admin.revoke_grant(grants[1].id, reason="that host only")
    states = [(await env.alice.get_grant(g.id)).state for g in grants]
    assert states.count(GrantState.REVOKING) == 1
    assert states.count(GrantState.PENDING_DELIVERY) == 2
    # Automatic rules grant at once, one per host.
    auto = await env.alice.create_request(
        selector={"env": "staging"}, action="deploy", duration=M15
    )
    assert auto.request.state is RequestState.APPROVED
    assert auto.grant is not None
    assert len(auto.request.grant_ids) == 1
    with pytest.raises(NotFoundError):
        await env.alice.create_request(selector={"env": "nowhere"}, action="deploy", duration=M15)


async def test_request_options_list_what_the_caller_may_ask_for(env: Env) -> None:
    users = await staged(env)
    try:
        # A Monday morning in Berlin: staging's automatic window is open.
        await env.clock.advance(timedelta(days=4, hours=9))
        options = await env.alice.request_options()
        by_key = {(o.agent, o.action): o for o in options}
        assert set(by_key) == {("db-1", "deploy"), ("web-1", "deploy")}
        prod_ = by_key[("db-1", "deploy")]
        assert (prod_.max_duration, prod_.plan.automatic) == (timedelta(hours=2), False)
        assert [s.name for s in prod_.plan.stages] == ["team", "security"]
        staging = by_key[("web-1", "deploy")]
        assert staging.plan.automatic
        assert (staging.automatic_left, staging.granted_time_left) == (2, timedelta(minutes=40))
        _, grant = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
        assert grant is not None
        (after,) = await env.alice.request_options(agent="web-1")
        # The automatic grant is live but no request would reuse it (nobody approved it).
        assert (after.automatic_left, after.live_grant_id) == (1, "")
        # bob (sre) is allowed nothing by this policy.
        assert await env.bob.request_options() == []
    finally:
        for c in users.values():
            await c.close()
