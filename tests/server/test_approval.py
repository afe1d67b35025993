"""`apply_review`, pure, over every stage, deny, timeout and deadline combination of a small
universe (exhaustively), plus properties over random ones (hypothesis), with a fake clock: every
instant is an argument."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jitmesh.types import (
    ApprovalPlan,
    ApprovalStage,
    RequestState,
    Review,
    ReviewDecision,
    StageMode,
)
from server.domain.approval import (
    Outcome,
    Usage,
    apply_review,
    auto_decision,
    budget_usage,
    recorded_groups,
    review_refusal,
    within_budget,
)
from server.domain.models import Principal
from server.domain.policy import Auto, Budget

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday
DEADLINE = T0 + timedelta(hours=1)
APPROVE, DENY = ReviewDecision.APPROVE, ReviewDecision.DENY
P, A, D, E = RequestState.PENDING, RequestState.APPROVED, RequestState.DENIED, RequestState.EXPIRED

TEAM = ApprovalStage(
    "team",
    approvals=2,
    groups=("sre",),
    users=("carol",),
    timeout=timedelta(minutes=10),
    escalation_groups=("oncall",),
)
SECURITY = ApprovalStage("security", approvals=1, groups=("security",))
PLAN = ApprovalPlan(policy_version=3, rule="prod", stages=(TEAM, SECURITY))

# Who can act, with the groups they hold.
PEOPLE = {
    "sre1": ("sre",),
    "sre2": ("sre",),
    "carol": (),
    "oncall1": ("oncall",),
    "sec1": ("security",),
    "outsider": ("developers",),
    "ALICE": ("sre", "security"),  # the requester, spelt otherwise
}


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def review(
    who: str, decision: ReviewDecision, minutes: float, groups: tuple[str, ...] | None = None
) -> Review:
    return Review(who, decision, "", at(minutes), PEOPLE.get(who, ()) if groups is None else groups)


def outcome(reviews: list[Review], now: float = 59, plan: ApprovalPlan = PLAN) -> Outcome:
    return apply_review(plan, reviews, at(now), requester="alice", opened_at=T0, deadline=DEADLINE)


# The rules, one by one.


def test_no_reviews_is_pending_until_the_deadline_then_expired() -> None:
    first = outcome([], now=0)
    assert (first.state, first.stage, first.next_change_at) == (P, 0, at(10))
    assert outcome([], now=30).next_change_at == DEADLINE  # escalated: only the deadline left
    late = outcome([], now=60)
    assert (late.state, late.decided_at, late.decided_by) == (E, DEADLINE, "coordinator")


def test_two_stages_in_order_with_distinct_people() -> None:
    reviews = [review("sre1", APPROVE, 1), review("carol", APPROVE, 2), review("sec1", APPROVE, 3)]
    result = outcome(reviews)
    assert (result.state, result.decided_by, result.decided_at) == (A, "sec1", at(3))
    assert result.counted == (("sre1", "carol"), ("sec1",))


def test_a_later_stage_approval_before_its_stage_opens_does_not_count() -> None:
    reviews = [review("sec1", APPROVE, 1), review("sre1", APPROVE, 2), review("sre2", APPROVE, 3)]
    result = outcome(reviews)
    assert (result.state, result.stage) == (P, 1)
    assert ("sec1", "not an approver of stage team") in result.ignored


def test_one_person_counts_once_even_when_eligible_for_two_stages() -> None:
    both = ("sre", "security")
    reviews = [
        review("bob", APPROVE, 1, both),
        review("bob", APPROVE, 2, both),
        review("sre2", APPROVE, 3),
    ]
    result = outcome(reviews)
    assert (result.state, result.stage) == (P, 1)
    assert result.counted == (("bob", "sre2"), ())


def test_escalation_group_is_eligible_only_after_the_stage_timeout() -> None:
    early = outcome([review("oncall1", APPROVE, 9), review("sre1", APPROVE, 11)])
    assert early.counted[0] == ("sre1",)
    late = outcome([review("oncall1", APPROVE, 10), review("sre1", APPROVE, 11)])
    assert late.counted[0] == ("oncall1", "sre1")
    assert late.stage == 1


def test_the_second_stage_timeout_counts_from_when_it_opened() -> None:
    stage2 = ApprovalStage(
        "security",
        groups=("security",),
        timeout=timedelta(minutes=5),
        escalation_groups=("oncall",),
    )
    plan = ApprovalPlan(1, "r", (TEAM, stage2))
    first = [review("sre1", APPROVE, 20), review("sre2", APPROVE, 21)]
    assert outcome([*first, review("oncall1", APPROVE, 25)], plan=plan).state is P
    assert outcome([*first, review("oncall1", APPROVE, 26)], plan=plan).state is A
    assert outcome(first, now=22, plan=plan).next_change_at == at(26)


def test_deny_from_an_eligible_person_wins_over_approvals() -> None:
    reviews = [review("sre1", APPROVE, 1), review("sec1", DENY, 2), review("sre2", APPROVE, 3)]
    result = outcome(reviews)
    assert (result.state, result.decided_by, result.decided_at) == (D, "sec1", at(2))


def test_deny_from_someone_not_named_is_ignored() -> None:
    result = outcome([review("outsider", DENY, 1), review("oncall1", DENY, 2)])
    assert result.state is P
    assert [who for who, _ in result.ignored] == ["outsider", "oncall1"]


def test_deny_from_a_passed_stage_is_ignored() -> None:
    reviews = [review("sre1", APPROVE, 1), review("sre2", APPROVE, 2), review("carol", DENY, 3)]
    assert outcome(reviews).state is P


@pytest.mark.parametrize("name", ["alice", "ALICE", "Alice", "ａｌｉｃｅ", " alice "])
def test_own_request_never_counts_under_any_spelling(name: str) -> None:
    groups = ("sre", "security", "oncall")
    reviews = [review(name, APPROVE, 1, groups), review(name, DENY, 2, groups)]
    result = outcome(reviews)
    assert (result.state, result.counted) == (P, ((), ()))
    refusal = review_refusal(
        PLAN, result, Principal(name, frozenset(groups)), APPROVE, at(3), requester="alice"
    )
    assert refusal == "nobody may review their own request"


def test_the_requester_relaying_someone_elses_review_never_counts() -> None:
    # Self-approval under another name: a review of alice's request relayed by alice (holding a
    # delegated token) is hers, whoever it names; relayed by another delegate it counts.
    relayed = [replace(review("sre1", APPROVE, 1), via="Alice")]
    assert outcome(relayed).counted == ((), ())
    deny = [replace(review("sre1", DENY, 1), via="alice")]
    assert outcome(deny).state is P
    bridged = [replace(review("sre1", APPROVE, 1), via="slack-bridge")]
    assert outcome(bridged).counted == (("sre1",), ())
    as_bob = Principal("sre1", frozenset({"sre"}), via="ALICE")
    refusal = review_refusal(PLAN, outcome([]), as_bob, APPROVE, at(3), requester="alice")
    assert refusal == "nobody may review their own request"


def test_membership_is_judged_when_reviewing() -> None:
    # sre1 left sre before reviewing: the recorded groups say so, the approval does not count.
    left = outcome([Review("sre1", APPROVE, "", at(1), ())])
    assert left.counted[0] == ()
    # Recorded while a member: it counts, whatever happens to the group later.
    stayed = outcome([Review("sre1", APPROVE, "", at(1), ("sre",))])
    assert stayed.counted[0] == ("sre1",)


def test_reviews_at_or_after_the_deadline_are_ignored() -> None:
    reviews = [review("sre1", APPROVE, 1), review("sre2", APPROVE, 2), review("sec1", APPROVE, 60)]
    assert outcome(reviews, now=61).state is E
    assert outcome([review("sec1", DENY, 60)], now=61).state is E


def test_all_mode_needs_one_from_each_group() -> None:
    stage = ApprovalStage(
        "owners",
        approvals=2,
        mode=StageMode.ALL,
        groups=("dba", "sre"),
        timeout=timedelta(minutes=10),
        escalation_groups=("oncall",),
    )
    plan = ApprovalPlan(1, "r", (stage,))

    def run(*revs: tuple[str, tuple[str, ...], float]) -> RequestState:
        return RequestState(
            outcome([Review(w, APPROVE, "", at(m), g) for w, g, m in revs], plan=plan).state
        )

    assert run(("a", ("sre",), 1), ("b", ("sre",), 2)) is P
    assert run(("a", ("sre",), 1), ("b", ("dba",), 2)) is A
    assert run(("a", ("sre", "dba"), 1)) is P  # one person, two groups: still N=2 in total
    assert run(("a", ("sre", "dba"), 1), ("b", ("sre",), 2)) is A
    # An escalation approver stands in for the missing group, only after the timeout.
    assert run(("a", ("sre",), 1), ("c", ("oncall",), 5)) is P
    assert run(("a", ("sre",), 1), ("c", ("oncall",), 10)) is A


def test_approvals_outside_the_approve_windows_do_not_count() -> None:
    stage = ApprovalStage("s", groups=("sre",))
    plan = ApprovalPlan(1, "r", (stage,), approve_windows=("weekdays 08:00-20:00 Europe/Berlin",))
    monday_evening = datetime(2026, 3, 2, 19, 30, tzinfo=UTC)  # 20:30 in Berlin
    monday_day = datetime(2026, 3, 2, 18, 30, tzinfo=UTC)  # 19:30 in Berlin
    for when, state in ((monday_evening, P), (monday_day, A)):
        result = apply_review(
            plan,
            [Review("sre1", APPROVE, "", when, ("sre",))],
            when,
            requester="alice",
            opened_at=when - timedelta(minutes=1),
            deadline=when + timedelta(hours=1),
        )
        assert result.state is state


def test_review_refusal_tells_what_is_needed() -> None:
    pending = outcome([], now=1)
    who = Principal("outsider", frozenset({"developers"}))
    assert "group sre, user carol" in review_refusal(
        PLAN, pending, who, APPROVE, at(1), requester="alice"
    )
    sec = Principal("sec1", frozenset({"security"}))
    assert "has not started" in review_refusal(
        PLAN, pending, sec, APPROVE, at(1), requester="alice"
    )
    assert review_refusal(PLAN, pending, sec, DENY, at(1), requester="alice") == ""
    oncall = Principal("oncall1", frozenset({"oncall"}))
    assert review_refusal(PLAN, pending, oncall, APPROVE, at(5), requester="alice") != ""
    late = outcome([], now=11)
    assert review_refusal(PLAN, late, oncall, APPROVE, at(11), requester="alice") == ""
    assert recorded_groups(PLAN, Principal("x", frozenset({"sre", "dev", "oncall"}))) == (
        "oncall",
        "sre",
    )


# Exhaustive: every combination of up to three reviews from the people above, each approving or
# denying at one of the instants that matter (before and after the escalation, at and after the
# deadline), judged at several instants. Each outcome is checked against the rules directly.

INSTANTS = (1.0, 10.0, 30.0, 60.0)
NOWS = (0.5, 9.0, 30.0, 59.0, 60.0, 90.0)


def _actions() -> list[tuple[str, ReviewDecision, float]]:
    return [(w, d, m) for w in PEOPLE for d in (APPROVE, DENY) for m in INSTANTS]


def _check(reviews: list[Review], now: float) -> None:
    result = outcome(reviews, now=now)
    assert result == outcome(list(reversed(reviews)), now=now) or len(
        {r.reviewed_at for r in reviews}
    ) < len(reviews)
    valid = [r for r in reviews if r.reviewed_at <= at(now) and r.reviewed_at < DEADLINE]
    counted = [name for stage in result.counted for name in stage]
    # Nobody counts twice, the requester never counts, only approvals count.
    assert len(counted) == len(set(counted))
    assert "ALICE" not in counted
    approvers = {r.reviewer for r in valid if r.decision is APPROVE}
    assert set(counted) <= approvers
    if result.state is A:
        assert result.counted[0]
        assert len(result.counted[0]) == 2
        assert len(result.counted[1]) == 1
        assert result.decided_at is not None
        assert result.decided_at < DEADLINE
    if result.state is D:
        denier = result.decided_by
        assert any(r.reviewer == denier and r.decision is DENY for r in valid)
        assert denier not in ("outsider", "ALICE")
    if result.state is E:
        assert at(now) >= DEADLINE
    if at(now) >= DEADLINE:
        assert result.state is not P
    # Time only moves forward: later, a decided outcome stays as it was.
    if result.state in (A, D):
        assert outcome(reviews, now=now + 100) == result


def test_exhaustive_up_to_three_reviews() -> None:
    actions = _actions()
    checked = 0
    for size in (0, 1, 2):
        for combo in itertools.combinations(actions, size):
            reviews = [review(w, d, m) for w, d, m in combo]
            for now in NOWS:
                _check(reviews, now)
                checked += 1
    # Three reviews: each a distinct person, distinct times, over the interesting instants.
    for combo in itertools.combinations(actions, 3):
        if len({w for w, _, _ in combo}) < 3:
            continue
        _check([review(w, d, m) for w, d, m in combo], 59.0)
        checked += 1
    assert checked > 25_000


def test_exhaustive_deny_wins_over_any_approvals() -> None:
    eligible_deniers = ("sre1", "carol", "sec1")
    approvals = [review("sre1", APPROVE, 1), review("carol", APPROVE, 2)]
    for denier in eligible_deniers:
        for minute in (0.5, 1.5, 2.5):
            reviews = [*approvals, review(denier, DENY, minute)]
            result = outcome(reviews)
            if denier == "sec1" or minute < {"sre1": 1, "carol": 2}.get(denier, 99):
                assert result.state is D, (denier, minute)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(sorted(PEOPLE)),
            st.sampled_from([APPROVE, DENY]),
            st.floats(min_value=0, max_value=80, allow_nan=False),
        ),
        max_size=7,
    ),
    st.floats(min_value=0, max_value=120, allow_nan=False),
)
def test_properties_over_random_reviews(
    raw: list[tuple[str, ReviewDecision, float]], now: float
) -> None:
    reviews = [review(w, d, m) for w, d, m in raw]
    result = outcome(reviews, now=now)
    # Reviews by the requester or by nobody named never change the outcome.
    noise = [r for r in reviews if r.reviewer not in ("ALICE", "outsider")]
    assert outcome(noise, now=now).state is result.state
    # Dropping an approval never turns a request approved.
    if result.state is not A:
        for k, r in enumerate(reviews):
            if r.decision is APPROVE:
                assert outcome(reviews[:k] + reviews[k + 1 :], now=now).state is not A


# Budgets and windows for automatic approval.


def test_budget_usage_counts_time_until_released_or_expired() -> None:
    grants = [
        (at(0), at(60), None),  # ran its full hour
        (at(0), at(60), at(15)),  # released after 15 minutes
    ]
    assert budget_usage(grants, at(120)) == Usage(2, timedelta(minutes=75))


def test_budget_by_count_and_by_time() -> None:
    assert within_budget(5, None, Usage(4, timedelta(0)), timedelta(hours=1))[0]
    ok, line = within_budget(5, None, Usage(5, timedelta(0)), timedelta(hours=1))
    assert not ok
    assert "5 of 5 automatic grants" in line
    assert "waits for a person" in line
    assert within_budget(
        None, timedelta(hours=2), Usage(1, timedelta(hours=1)), timedelta(hours=1)
    )[0]
    assert not within_budget(
        None, timedelta(hours=2), Usage(1, timedelta(hours=1)), timedelta(minutes=61)
    )[0]


def test_auto_decision_with_window_and_budget() -> None:
    auto = Auto(windows=["weekdays 08:00-20:00 Europe/Berlin"], budget=Budget(count=2))
    monday_morning = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)  # 09:00 Berlin
    saturday = datetime(2026, 3, 7, 10, 0, tzinfo=UTC)
    ok, notes = auto_decision(auto, Usage(1, timedelta(0)), timedelta(hours=1), monday_morning)
    assert ok
    assert "open now" in notes[0]
    assert "1 of 2" in notes[1]
    assert not auto_decision(auto, Usage(1, timedelta(0)), timedelta(hours=1), saturday)[0]
    assert not auto_decision(auto, Usage(2, timedelta(0)), timedelta(hours=1), monday_morning)[0]
    assert auto_decision(Auto(), Usage(99, timedelta(days=9)), timedelta(hours=1), saturday) == (
        True,
        (),
    )
    assert auto_decision(None, Usage(0, timedelta(0)), timedelta(hours=1), saturday) == (False, ())
