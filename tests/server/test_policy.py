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
    assert message.endswith("rules[0]: unknown key 'aprovals' (did you mean 'approval'?)")


def test_rule_without_subjects_names_is_refused() -> None:
    assert "rules[0].subjects" in refused(HEADER + rule(subjects="{users: []}"))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("- just\n- a list\n", "YAML mapping"),
        ("rules: []\n", "actions"),
        ("version: 3\nactions: [deploy]\n", "version"),
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


# Version 2: stages, automatic approval with limits, tickets, pending lifetime, windows.

V2 = """\
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
    ticket: '^(INC|CHG)-[0-9]+$'
    pending_ttl: 30m
    approval:
      auto:
        windows: ["weekdays 08:00-20:00 Europe/Berlin"]
        budget: {count: 5, granted: 2h}
      stages:
        - {name: team, approvals: 2, groups: [sre], users: [Carol], timeout: 15m,
           escalate_to: [oncall]}
        - {name: owners, mode: all, groups: [dba, security]}
      approve_windows: ["mon-fri 07:00-22:00 UTC"]
"""


def test_version_2_document_loads_with_stages_and_limits() -> None:
    from server.domain.policy import pending_ttl, plan_for

    parsed = parse_policy(V2)
    rule_ = parsed.model.rules[0]
    assert rule_.ticket_ok("INC-42")
    assert not rule_.ticket_ok("INC-42x")
    assert pending_ttl(parsed, rule_) == timedelta(minutes=30)
    plan = plan_for(parsed, rule_)
    assert [s.name for s in plan.stages] == ["team", "owners"]
    assert plan.stages[0].users == ("carol",)  # folded like every user name
    assert plan.stages[1].mode.value == "all"
    found = decision(match(parsed, user("alice", "developers"), "deploy", "db-1", {"env": "prod"}))
    text = "\n".join(found.trace)
    assert (
        "stage team: 2 approval(s) from group sre, user carol; after 15m also from group oncall"
        in text
    )
    assert "ticket: required" in text
    assert "automatic within its limits" in text
    assert found.approvals_required == 3
    assert found.approver_groups == ("sre", "dba", "security")


def test_version_1_documents_keep_their_meaning() -> None:
    from server.domain.policy import plan_for

    parsed = parse_policy(DEV_POLICY)
    assert parsed.model.version == 1
    staging, prod = parsed.model.rules[0], parsed.model.rules[1]
    assert staging.approval.always_auto
    assert plan_for(parsed, staging).stages == ()
    (stage,) = plan_for(parsed, prod).stages
    assert (stage.approvals, stage.groups, stage.mode.value) == (1, ("sre",), "any")
    legacy = parse_policy(HEADER + rule(approval="{mode: manual, approvals: 2, from_groups: [a]}"))
    assert legacy.model.rules[0].approval.stages[0].approvals == 2


@pytest.mark.parametrize(
    ("approval", "says"),
    [
        ("{stages: []}", "approval needs stages, or auto"),
        ("{auto: {budget: {count: 1}}}", "needs stages"),
        ("{stages: [{groups: [a], timeout: 5m}]}", "timeout and escalate_to go together"),
        ("{stages: [{mode: all, users: [bob]}]}", "mode all needs groups"),
        ("{stages: [{users: ['*']}]}", "'*' cannot approve"),
        ("{auto: {windows: ['weekdays 8-20 Europe/Berlin']}, stages: [{groups: [a]}]}", "HH:MM"),
        (
            "{auto: {windows: ['daily 08:00-20:00 Mars/Olympus']}, stages: [{groups: [a]}]}",
            "unknown time zone",
        ),
        ("{auto: {budget: {}}, stages: [{groups: [a]}]}", "a budget names count"),
        ("{approvals: 1, from_groups: [a], stages: [{groups: [a]}]}", "either stages or"),
    ],
)
def test_version_2_mistakes_are_named(approval: str, says: str) -> None:
    assert says in refused(HEADER + rule(approval=approval))


def test_bad_ticket_pattern_is_refused() -> None:
    assert "ticket is not a valid regular expression" in refused(HEADER + rule(ticket="'(['"))


def test_windows_in_a_named_zone() -> None:
    from datetime import UTC, datetime

    from server.domain.windows import WindowError, parse_window

    berlin = parse_window("weekdays 08:00-20:00 Europe/Berlin")
    # Summer time: 06:30 UTC is 08:30 in Berlin; winter: 07:30 UTC is 08:30.
    assert berlin.contains(datetime(2026, 7, 6, 6, 30, tzinfo=UTC))
    assert not berlin.contains(datetime(2026, 1, 5, 6, 30, tzinfo=UTC))
    assert berlin.contains(datetime(2026, 1, 5, 7, 30, tzinfo=UTC))
    assert not berlin.contains(datetime(2026, 1, 10, 12, 0, tzinfo=UTC))  # Saturday
    night = parse_window("fri 22:00-06:00 UTC")
    assert night.contains(datetime(2026, 1, 9, 23, 0, tzinfo=UTC))  # Friday night
    assert night.contains(datetime(2026, 1, 10, 5, 59, tzinfo=UTC))  # Saturday morning
    assert not night.contains(datetime(2026, 1, 10, 22, 30, tzinfo=UTC))  # Saturday night
    assert parse_window("sat,sun 00:00-24:00 utc").contains(
        datetime(2026, 1, 11, 23, 59, tzinfo=UTC)
    )
    assert parse_window("sun-tue 10:00-11:00 UTC").days == frozenset({6, 0, 1})
    for bad in (
        "weekdays Europe/Berlin",
        "moon 08:00-09:00 UTC",
        "daily 08:00-08:00 UTC",
        "daily 08:00-09:00 ../../etc/passwd",
    ):
        with pytest.raises(WindowError):
            parse_window(bad)
