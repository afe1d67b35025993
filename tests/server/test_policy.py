"""The policy engine, pure: parsing with errors that name the place, matching, decisions."""

from __future__ import annotations

from datetime import timedelta

import pytest

from server.domain.errors import InvalidArgument
from server.domain.models import Principal
from server.domain.policy import (
    DEV_POLICY,
    EMPTY_POLICY,
    MAX_POLICY_BYTES,
    Policy,
    decision,
    match,
    parse_policy,
)

HEADER = "version: 1\nactions: [deploy, restart, logs]\nrules:\n"


def rule(name: str = "r", **fields: str) -> str:
    """One rule as YAML; fields override the defaults (values are YAML flow text)."""
    values = {
        "subjects": "{users: [alice]}",
        "actions": "[deploy]",
        "agents": "{names: ['*']}",
        **fields,
    }
    lines = [f"  - name: {name}"] + [f"    {k}: {v}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def policy(*rules: str) -> Policy:
    return parse_policy(HEADER + "".join(rules))


def refused(text: str) -> str:
    with pytest.raises(InvalidArgument) as info:
        parse_policy(text)
    return info.value.message


def user(name: str, *groups: str) -> Principal:
    return Principal(name, frozenset(groups))


# Parsing.


def test_bad_yaml_names_the_line() -> None:
    text = HEADER + "  - name: r\n    subjects: {users: [alice]\n    actions: [deploy]\n"
    message = refused(text)
    assert "not valid YAML at line 6" in message


def test_bad_field_names_its_path() -> None:
    message = refused(HEADER + rule(max_duration="forever"))
    assert "rules[0].max_duration" in message
    assert "forever" not in message  # raw input is not echoed


def test_path_names_the_right_rule() -> None:
    message = refused(HEADER + rule("a") + rule("b", max_duration="0s"))
    assert "rules[1].max_duration" in message
    assert "positive" in message


def test_unknown_action_in_a_rule() -> None:
    message = refused(HEADER + rule(actions="[deploy, nuke]"))
    assert "rules[0] (r)" in message
    assert "not in the actions list" in message


def test_duplicate_rule_names() -> None:
    message = refused(HEADER + rule("same") + rule("same"))
    assert "rules[1]" in message
    assert "used twice" in message


def test_manual_approval_needs_groups() -> None:
    message = refused(HEADER + rule(approval="{approvals: 1}"))
    assert "rules[0].approval" in message
    assert "from_groups" in message


def test_unknown_field_is_refused() -> None:
    message = refused(HEADER + rule(aprovals="2"))
    assert "rules[0].aprovals" in message


def test_rule_without_subjects_names_is_refused() -> None:
    assert "rules[0].subjects" in refused(HEADER + rule(subjects="{users: []}"))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("- just\n- a list\n", "YAML mapping"),
        ("rules: []\n", "actions"),
        ("version: 2\nactions: [deploy]\n", "version"),
        ("actions: ['*']\n", "list the actions by name"),
        ("actions: [Deploy]\n", "actions"),
        ("actions: [deploy]\nrequest_ttl: soon\n", "request_ttl"),
        (HEADER + rule(offline="{mode: revoke_after}"), "rules[0].offline"),
    ],
)
def test_other_invalid_documents(text: str, fragment: str) -> None:
    assert fragment in refused(text)


def test_oversized_policy_is_refused_before_parsing() -> None:
    text = EMPTY_POLICY + "#" * MAX_POLICY_BYTES
    assert "larger than" in refused(text)


def test_yaml_1_2_keeps_no_and_times_as_strings() -> None:
    # PyYAML (YAML 1.1) would read these as false and 750.
    parsed = parse_policy("actions: [deploy, no, off]\nrequest_ttl: 1h\nrules: []\n")
    assert parsed.model.actions == ["deploy", "no", "off"]


def test_valid_policy_keeps_its_text_and_hash() -> None:
    parsed = parse_policy(DEV_POLICY)
    assert parsed.text == DEV_POLICY
    assert len(parsed.sha256) == 64
    assert [r.name for r in parsed.model.rules] == [
        "staging-self-service",
        "prod-with-approval",
        "sre-prod",
    ]


# Matching.


def test_match_by_user_name_and_its_variants() -> None:
    p = policy(rule(subjects="{users: [alice]}"))
    assert match(p, user("alice"), "deploy", "web-1", {}).rule is not None
    assert match(p, user("Alice"), "deploy", "web-1", {}).rule is not None
    assert match(p, user("bob"), "deploy", "web-1", {}).rule is None


def test_match_by_group() -> None:
    p = policy(rule(subjects="{groups: [sre]}"))
    assert match(p, user("bob", "sre"), "deploy", "web-1", {}).rule is not None
    assert match(p, user("bob", "developers"), "deploy", "web-1", {}).rule is None
    assert match(p, user("sre"), "deploy", "web-1", {}).rule is None  # a name is not a group


@pytest.mark.parametrize("subjects", ["{users: ['*']}", "{groups: ['*']}"])
def test_star_subject_matches_anyone(subjects: str) -> None:
    p = policy(rule(subjects=subjects))
    assert match(p, user("zed"), "deploy", "web-1", {}).rule is not None


def test_star_action_matches_every_catalogued_action_only() -> None:
    p = policy(rule(actions="['*']"))
    assert match(p, user("alice"), "logs", "web-1", {}).rule is not None
    found = match(p, user("alice"), "shell", "web-1", {})
    assert found.rule is None
    assert "not in the policy's actions" in found.explanation


def test_match_by_agent_labels_needs_every_label() -> None:
    p = policy(rule(agents="{labels: {env: prod, team: db}}"))
    assert match(p, user("alice"), "deploy", "db-1", {"env": "prod", "team": "db"}).rule
    assert match(p, user("alice"), "deploy", "db-1", {"env": "prod"}).rule is None
    assert match(p, user("alice"), "deploy", "db-1", {"env": "prod", "team": "web"}).rule is None


def test_match_by_agent_name() -> None:
    p = policy(rule(agents="{names: [web-1, web-2]}"))
    assert match(p, user("alice"), "deploy", "web-2", {}).rule is not None
    assert match(p, user("alice"), "deploy", "web-3", {}).rule is None


def test_names_and_labels_must_both_match() -> None:
    p = policy(rule(agents="{names: [web-1], labels: {env: staging}}"))
    assert match(p, user("alice"), "deploy", "web-1", {"env": "staging"}).rule is not None
    assert match(p, user("alice"), "deploy", "web-1", {"env": "prod"}).rule is None
    assert match(p, user("alice"), "deploy", "web-2", {"env": "staging"}).rule is None


@pytest.mark.parametrize("deny_first", [True, False])
def test_deny_wins_regardless_of_order(deny_first: bool) -> None:
    allow = rule("allow-all", subjects="{users: ['*']}")
    deny = rule("no-alice", effect="deny")
    p = policy(deny, allow) if deny_first else policy(allow, deny)
    found = match(p, user("alice"), "deploy", "web-1", {})
    assert found.rule is None
    assert found.explanation == "denied by rule no-alice"
    assert not decision(found).allowed
    # The deny is narrow: others still get in through the allow rule.
    assert match(p, user("bob"), "deploy", "web-1", {}).rule is not None


def test_first_allow_rule_in_document_order_decides() -> None:
    p = policy(rule("first", max_duration="10m"), rule("second", max_duration="2h"))
    found = match(p, user("alice"), "deploy", "web-1", {})
    assert found.rule is not None
    assert found.rule.name == "first"
    assert found.trace == ("first (allow): matches", "second (allow): matches")


def test_default_deny_with_a_trace_of_every_rule() -> None:
    p = policy(rule("a", subjects="{users: [bob]}"), rule("b", actions="[logs]"))
    found = match(p, user("alice"), "deploy", "web-1", {})
    assert found.rule is None
    assert found.explanation == "no rule allows this (default deny)"
    assert found.trace == ("a (allow): no match on subject", "b (allow): no match on action")
    result = decision(found)
    assert not result.allowed
    assert result.rule == ""


def test_empty_policy_denies_everything() -> None:
    found = match(parse_policy(EMPTY_POLICY), user("admin", "admins"), "deploy", "web-1", {})
    assert found.rule is None


# Decisions.


def test_decision_refuses_duration_above_the_maximum() -> None:
    found = match(policy(rule(max_duration="30m")), user("alice"), "deploy", "web-1", {})
    assert decision(found, timedelta(minutes=30)).allowed
    above = decision(found, timedelta(minutes=30, seconds=1))
    assert not above.allowed
    assert above.rule == "r"
    assert "maximum duration is 30m" in above.explanation
    assert above.max_duration == timedelta(minutes=30)


def test_decision_of_a_manual_rule() -> None:
    p = policy(
        rule(
            reason="required", approval="{approvals: 2, from_groups: [sre, dba]}", max_duration="2h"
        )
    )
    result = decision(match(p, user("alice"), "deploy", "web-1", {}))
    assert result.allowed
    assert result.approval_required
    assert result.approvals_required == 2
    assert result.approver_groups == ("sre", "dba")
    assert result.reason_required
    assert result.max_duration == timedelta(hours=2)


def test_decision_of_an_auto_rule() -> None:
    result = decision(match(policy(rule()), user("alice"), "deploy", "web-1", {}))
    assert result.allowed
    assert not result.approval_required
    assert result.approvals_required == 0
    assert result.approver_groups == ()
    assert not result.reason_required
    assert result.max_duration == timedelta(hours=1)  # the default, never unbounded


# The development policy.

DEV = parse_policy(DEV_POLICY)
ALICE = user("alice", "developers")
BOB = user("bob", "sre")
CAROL = user("carol", "sre")
STAGING = {"env": "staging"}
PROD = {"env": "prod"}


def dev(principal: Principal, action: str, labels: dict[str, str]) -> tuple[bool, str, bool]:
    result = decision(match(DEV, principal, action, "host-1", labels))
    return result.allowed, result.rule, result.approval_required


@pytest.mark.parametrize(
    ("principal", "action", "labels", "expected"),
    [
        (ALICE, "deploy", STAGING, (True, "staging-self-service", False)),
        (ALICE, "logs", STAGING, (True, "staging-self-service", False)),
        (ALICE, "shell", STAGING, (False, "", False)),
        (ALICE, "deploy", PROD, (True, "prod-with-approval", True)),
        (ALICE, "shell", PROD, (False, "", False)),
        (ALICE, "deploy", {}, (False, "", False)),
        (BOB, "deploy", STAGING, (False, "", False)),
        (BOB, "shell", PROD, (True, "sre-prod", True)),
        (BOB, "db-migrate", PROD, (True, "sre-prod", True)),
        (CAROL, "restart", PROD, (True, "sre-prod", True)),
        (CAROL, "logs", STAGING, (False, "", False)),
    ],
)
def test_dev_policy_decisions(
    principal: Principal, action: str, labels: dict[str, str], expected: tuple[bool, str, bool]
) -> None:
    assert dev(principal, action, labels) == expected


def test_dev_policy_prod_rules_require_a_reason_and_sre() -> None:
    result = decision(match(DEV, ALICE, "deploy", "db-1", PROD))
    assert result.reason_required
    assert result.approver_groups == ("sre",)
    bob = decision(match(DEV, BOB, "shell", "db-1", PROD), timedelta(hours=4))
    assert bob.allowed
    assert not decision(match(DEV, BOB, "shell", "db-1", PROD), timedelta(hours=5)).allowed
