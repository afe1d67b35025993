"""Audit kinds are one enum: the coordinator writes no kind outside it (mypy --strict holds
every `AuditEntry` to `AuditKind | ObservedKind`), notices and metrics name members of it, and
docs/concepts.md lists exactly these kinds, and the agents' own, for whoever feeds a SIEM."""

from __future__ import annotations

import re
from pathlib import Path

from agent.domain.leases import EventKind
from server.domain.models import AuditKind, observed
from server.domain.notices import NoticeKind
from server.metrics import REQUEST_OUTCOMES

CONCEPTS = Path(__file__).parents[2] / "docs" / "concepts.md"


def test_kinds_are_area_dot_event_and_distinct() -> None:
    values = [k.value for k in AuditKind]
    assert len(values) == len(set(values))
    for kind in AuditKind:
        assert re.fullmatch(r"[a-z]+\.[a-z_]+", kind.value), kind
        assert kind.name == kind.value.upper().replace(".", "_"), kind


def test_notices_and_metrics_name_audit_kinds() -> None:
    assert {k.value for k in NoticeKind} <= {k.value for k in AuditKind}
    assert set(REQUEST_OUTCOMES) <= {k.value for k in AuditKind}


def test_agent_reported_kinds_stay_apart() -> None:
    """What an agent reports keeps its own name under `agent.`, clipped as stored before, and
    never collides with a kind the coordinator writes."""
    assert observed("grant.expired") == "agent.grant.expired"
    assert observed("x" * 60) == "agent." + "x" * 48
    assert {observed(k) for k in EventKind}.isdisjoint({k.value for k in AuditKind})


def test_the_concepts_page_lists_every_kind() -> None:
    section = CONCEPTS.read_text().split("## Audit event kinds", 1)[1]
    listed = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)+)`", section))
    expected = {k.value for k in AuditKind} | {observed(k) for k in EventKind}
    assert listed == expected, (sorted(expected - listed), sorted(listed - expected))
