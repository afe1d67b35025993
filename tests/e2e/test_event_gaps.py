"""The coordinator notices lost agent events: each agent numbers its events, and a jump in the
numbers (or a restart of them) is audited."""

from __future__ import annotations

from datetime import UTC, datetime

from server.domain.models import AgentObservation, Principal

from .conftest import Mesh


def event(event_id: str, counter: int) -> AgentObservation:
    return AgentObservation(
        event_id=event_id,
        kind="drift.removed",
        grant_id="",
        subject="alice",
        action="deploy",
        observed_at=datetime(2026, 1, 1, tzinfo=UTC),
        details={},
        counter=counter,
    )


async def test_gaps_and_resets_in_agent_event_counters_are_audited(mesh: Mesh) -> None:
    fleet = mesh.coordinator.fleet
    agent = Principal("web-9", kind="agent")
    await fleet.observed(agent, event("ev-1", 1))
    await fleet.observed(agent, event("ev-2", 2))
    await fleet.observed(agent, event("ev-2", 2))  # a resend: stored once, no gap
    await fleet.observed(agent, event("ev-5", 5))
    await fleet.observed(agent, event("ev-x", 1))
    admin = mesh.client("admin")
    events = await admin.list_audit(agent="web-9")
    kinds = [e.kind for e in events]
    assert kinds.count("agent.drift.removed") == 4
    missing = [e for e in events if e.kind == "agent.events_missing"]
    assert [(e.details["from"], e.details["to"]) for e in missing] == [("3", "4")]
    assert kinds.count("agent.event_counter_reset") == 1
