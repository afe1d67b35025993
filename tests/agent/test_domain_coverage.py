"""Reference counting of (subject, action) pairs."""

from __future__ import annotations

from datetime import timedelta

from agent.domain.coverage import covers, held_pairs, pair_changes, reconcile
from agent.domain.leases import LeaseState

from .factories import lease

PAIR = ("alice", "deploy")


def test_first_lease_applies_its_pair() -> None:
    new = lease(applied=False)
    changes = pair_changes([], starting=[new])
    assert changes.apply == {PAIR}
    assert changes.remove == frozenset()


def test_second_overlapping_lease_applies_nothing() -> None:
    first = lease()
    second = lease(applied=False)
    changes = pair_changes([first], starting=[second])
    assert changes.apply == frozenset()
    assert changes.remove == frozenset()


def test_ending_one_of_two_overlapping_leases_keeps_the_pair() -> None:
    first, second = lease(), lease()
    changes = pair_changes([first, second], ending=[first])
    assert changes.remove == frozenset()


def test_ending_the_last_holder_removes_the_pair() -> None:
    first, second = lease(), lease()
    assert pair_changes([first, second], ending=[first, second]).remove == {PAIR}
    assert pair_changes([second], ending=[second]).remove == {PAIR}


def test_replacing_a_holder_in_one_step_neither_applies_nor_removes() -> None:
    old, new = lease(), lease(applied=False)
    changes = pair_changes([old], starting=[new], ending=[old])
    assert changes == pair_changes([old], starting=[new], ending=[old])
    assert changes.apply == frozenset()
    assert changes.remove == frozenset()


def test_ending_a_lease_that_never_started_removes_nothing() -> None:
    scheduled = lease(applied=False)
    assert pair_changes([], ending=[scheduled]).remove == frozenset()


def test_other_pairs_are_counted_separately() -> None:
    alice = lease("alice", "deploy")
    bob = lease("bob", "deploy")
    alice_ssh = lease("alice", "ssh")
    changes = pair_changes([alice, bob, alice_ssh], ending=[alice, alice_ssh])
    assert changes.remove == {("alice", "deploy"), ("alice", "ssh")}


def test_leases_that_do_not_hold_are_not_counted_as_holders() -> None:
    removed = lease(state=LeaseState.REMOVED)
    pending = lease(applied=False)
    new = lease(applied=False)
    assert pair_changes([removed, pending], starting=[new]).apply == {PAIR}
    assert held_pairs([removed, pending]) == frozenset()


def test_reconcile_applies_missing_and_removes_unknown() -> None:
    plan = reconcile({("a", "x"), ("b", "y")}, {("b", "y"), ("c", "z")})
    assert plan.apply == {("a", "x")}
    assert plan.remove == {("c", "z")}


def test_the_window_is_the_latest_deadline_of_the_live_leases() -> None:
    short, long = lease(length=timedelta(minutes=5)), lease(length=timedelta(minutes=30))
    window = covers([short, long])[PAIR]
    assert (window.grant_id, window.not_after) == (long.grant_id, long.not_after)
    # A longer lease starting moves the deadline of a pair already in force: no apply.
    changes = pair_changes([short], starting=[long])
    assert (changes.apply, changes.moved) == (frozenset(), frozenset({PAIR}))
    assert changes.after[PAIR].not_after == long.not_after
    # The longest ending while the other still covers the pair: the deadline comes back.
    changes = pair_changes([short, long], ending=[long])
    assert (changes.remove, changes.moved) == (frozenset(), frozenset({PAIR}))
    assert changes.after[PAIR].not_after == short.not_after
    # A shorter one ending moves nothing.
    assert pair_changes([short, long], ending=[short]).moved == frozenset()
