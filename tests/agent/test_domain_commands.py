"""Command decisions: screening, grants, revokes and snapshot diffs."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from agent.domain.commands import (
    AckStatus,
    AlreadyEnded,
    Bury,
    End,
    Keep,
    Refuse,
    RevokeReason,
    RevokeSpec,
    SnapshotSpec,
    Write,
    decide_grant,
    decide_revoke,
    plan_snapshot,
    screen,
)
from agent.domain.leases import LeaseState, tombstone

from .factories import AGENT, T0, command, gid, grant, lease, revoke_after

MIN = timedelta(minutes=1)


# Screening.


def test_screen_passes_a_new_command() -> None:
    assert screen(command(5, grant()), own_name=AGENT, last_applied_seq=4) is None


def test_screen_rejects_a_command_for_another_agent() -> None:
    spec = grant()
    ack = screen(command(5, spec, agent="web-2"), own_name=AGENT, last_applied_seq=4)
    assert ack is not None
    assert (ack.status, ack.reason, ack.grant_id) == (
        AckStatus.REJECTED,
        "not for this agent",
        spec.grant_id,
    )


def test_screen_rejects_a_body_with_another_sequence_number() -> None:
    cmd = replace(command(5, grant()), body_seq=6)
    ack = screen(cmd, own_name=AGENT, last_applied_seq=4)
    assert ack is not None
    assert ack.status is AckStatus.REJECTED


@pytest.mark.parametrize("seq", [1, 4])
def test_screen_reacks_duplicates_as_duplicate(seq: int) -> None:
    ack = screen(command(seq, RevokeSpec(gid())), own_name=AGENT, last_applied_seq=4)
    assert ack is not None
    assert (ack.seq, ack.status, ack.reason) == (seq, AckStatus.DUPLICATE, "")


@pytest.mark.parametrize(
    ("seq", "status"), [(1, "NOT_APPLIED"), (2, "DUPLICATE"), (4, "DUPLICATE")]
)
def test_screen_says_what_a_snapshot_replaced(seq: int, status: str) -> None:
    """Snapshot 2 was applied after commands 1 (replaced) and before 3-4 (applied one by one)."""
    ack = screen(
        command(seq, RevokeSpec(gid())), own_name=AGENT, last_applied_seq=4, snapshot_seq=2
    )
    assert ack is not None
    assert ack.status is AckStatus(status)


def test_screen_never_treats_a_snapshot_as_duplicate() -> None:
    snap = command(2, SnapshotSpec(grants=()))
    assert screen(snap, own_name=AGENT, last_applied_seq=9) is None


# Grants.


def test_new_grant_is_written_as_a_new_active_lease() -> None:
    spec = grant(offline=revoke_after(MIN))
    decision = decide_grant(spec, None, seq=3, now=T0)
    assert isinstance(decision, Write)
    assert decision.new
    item = decision.lease
    assert (item.grant_id, item.pair, item.seq) == (spec.grant_id, ("alice", "deploy"), 3)
    assert item.state is LeaseState.ACTIVE
    assert item.applied_at is None
    assert item.offline == revoke_after(MIN)


@pytest.mark.parametrize(
    ("start", "length", "now_offset", "reason"),
    [
        (timedelta(0), 10 * MIN, 10 * MIN, "expired on arrival"),
        (timedelta(0), 10 * MIN, 11 * MIN, "expired on arrival"),
        (timedelta(0), timedelta(0), timedelta(0), "empty time window"),
        (timedelta(0), timedelta(days=400), timedelta(0), "not_after too far in the future"),
    ],
)
def test_grant_with_a_bad_window_is_refused(
    start: timedelta, length: timedelta, now_offset: timedelta, reason: str
) -> None:
    decision = decide_grant(grant(start=start, length=length), None, seq=1, now=T0 + now_offset)
    assert decision == Refuse(reason)


def test_grant_one_millisecond_before_its_end_is_accepted() -> None:
    spec = grant(length=10 * MIN)
    decision = decide_grant(spec, None, seq=1, now=T0 + 10 * MIN - timedelta(milliseconds=1))
    assert isinstance(decision, Write)


def test_grant_for_a_tombstoned_id_is_refused() -> None:
    spec = grant()
    buried = tombstone(spec.grant_id, seq=1, at=T0, reason="revoked")
    assert decide_grant(spec, buried, seq=2, now=T0) == Refuse("tombstoned")


@pytest.mark.parametrize("state", [LeaseState.REMOVED, LeaseState.FAILED])
def test_grant_for_an_ended_lease_is_refused(state: LeaseState) -> None:
    spec = grant()
    old = lease(grant_id=spec.grant_id, state=state)
    assert decide_grant(spec, old, seq=2, now=T0) == Refuse("grant already ended")


def test_same_grant_again_is_kept_without_effect() -> None:
    spec = grant()
    held = lease(grant_id=spec.grant_id)
    assert decide_grant(spec, held, seq=2, now=T0) == Keep(held)


def test_same_grant_with_a_later_end_extends_the_lease() -> None:
    held = lease(length=10 * MIN)
    spec = grant(grant_id=held.grant_id, length=20 * MIN)
    decision = decide_grant(spec, held, seq=7, now=T0 + MIN)
    assert isinstance(decision, Write)
    assert not decision.new
    assert decision.lease.not_after == T0 + 20 * MIN
    assert decision.lease.applied_at == held.applied_at
    assert decision.lease.seq == 7


def test_grant_id_reused_for_another_pair_is_refused() -> None:
    held = lease("alice", "deploy")
    spec = grant("mallory", "deploy", grant_id=held.grant_id)
    decision = decide_grant(spec, held, seq=2, now=T0)
    assert isinstance(decision, Refuse)


# Revokes.


def test_revoke_of_an_unknown_grant_leaves_a_tombstone() -> None:
    grant_id = gid()
    decision = decide_revoke(RevokeSpec(grant_id), None, seq=4, now=T0)
    assert isinstance(decision, Bury)
    assert decision.row.grant_id == grant_id
    assert decision.row.state is LeaseState.TOMBSTONE
    assert decision.row.seq == 4


def test_revoke_of_an_active_lease_ends_it_with_the_reason() -> None:
    held = lease()
    decision = decide_revoke(
        RevokeSpec(held.grant_id, RevokeReason.RELEASED), held, seq=5, now=T0 + MIN
    )
    assert isinstance(decision, End)
    assert decision.before == held
    assert decision.after.state is LeaseState.REMOVED
    assert decision.after.remove_reason == "released"
    assert decision.after.removed_at == T0 + MIN


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (LeaseState.REMOVED, "already ended"),
        (LeaseState.FAILED, "already ended"),
        (LeaseState.TOMBSTONE, "tombstoned"),
    ],
)
def test_revoke_of_an_ended_lease_changes_nothing(state: LeaseState, reason: str) -> None:
    old = lease(state=state)
    assert decide_revoke(RevokeSpec(old.grant_id), old, seq=5, now=T0) == AlreadyEnded(reason)


# Snapshots.


def test_snapshot_keeps_listed_starts_new_and_ends_unlisted() -> None:
    keep = lease("alice", "deploy")
    drop = lease("bob", "ssh")
    new = grant("carol", "deploy")
    spec = SnapshotSpec(grants=(grant("alice", "deploy", grant_id=keep.grant_id), new))
    active = [keep, drop]
    plan = plan_snapshot(spec, {x.grant_id: x for x in active}, active, seq=9, now=T0)
    assert [x.grant_id for x in plan.starting] == [new.grant_id]
    assert plan.ending == (drop,)
    assert plan.kept == 1
    assert plan.refused == ()
    written = {x.grant_id: x for x in plan.writes}
    assert written[drop.grant_id].state is LeaseState.REMOVED
    assert written[drop.grant_id].remove_reason == "snapshot"
    assert written[new.grant_id].state is LeaseState.ACTIVE
    assert keep.grant_id not in written


def test_snapshot_tombstones_beat_grants_and_end_active_leases() -> None:
    held = lease()
    late = grant("dave", "deploy")
    unknown = gid()
    spec = SnapshotSpec(
        grants=(late, grant(grant_id=held.grant_id)),
        tombstones=(held.grant_id, late.grant_id, unknown),
    )
    plan = plan_snapshot(spec, {held.grant_id: held}, [held], seq=3, now=T0)
    assert plan.starting == ()
    assert plan.ending == (held,)
    assert sorted(plan.refused) == sorted(
        [(late.grant_id, "tombstoned"), (held.grant_id, "tombstoned")]
    )
    states = {x.grant_id: x.state for x in plan.writes}
    assert states == {
        held.grant_id: LeaseState.TOMBSTONE,
        late.grant_id: LeaseState.TOMBSTONE,
        unknown: LeaseState.TOMBSTONE,
    }


def test_snapshot_refuses_expired_and_locally_ended_grants() -> None:
    expired = grant(length=MIN)
    revoked = lease(state=LeaseState.REMOVED)
    spec = SnapshotSpec(grants=(expired, grant(grant_id=revoked.grant_id)))
    plan = plan_snapshot(spec, {revoked.grant_id: revoked}, [], seq=3, now=T0 + 2 * MIN)
    assert dict(plan.refused) == {
        expired.grant_id: "expired on arrival",
        revoked.grant_id: "grant already ended",
    }
    assert plan.writes == ()


def test_empty_snapshot_ends_everything() -> None:
    active = [lease(), lease("bob", "ssh")]
    plan = plan_snapshot(SnapshotSpec(grants=()), {}, active, seq=1, now=T0)
    assert set(plan.ending) == set(active)
    assert all(x.state is LeaseState.REMOVED for x in plan.writes)
