"""Enforcement: the one place where leases change the host, reference-counted per pair."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from agent.domain.coverage import Cover
from agent.domain.errors import EnforcerError
from agent.domain.leases import Pair
from agent.enforcers.base import EnforcerSet
from tests.agent.factories import lease
from tests.agent.fakes import RecordingEnforcer

from .conftest import Bench

PAIR = ("alice", "deploy")


async def test_overlapping_leases_apply_once_and_remove_with_the_last(bench: Bench) -> None:
    enforce, hook = bench.parts.enforcement.enforce, bench.hook
    first, second = lease(), lease(length=timedelta(hours=1))
    await enforce([], starting=[first])
    await enforce([first], starting=[second])
    assert hook.count("apply", PAIR) == 1
    failures = await enforce([first, second], ending=[first])
    assert hook.count("remove", PAIR) == 0
    assert PAIR in hook.in_force
    failures = await enforce([second], ending=[second])
    assert hook.count("remove", PAIR) == 1
    assert (failures.apply, failures.remove) == ({}, {})


async def test_failures_are_returned_per_pair(bench: Bench) -> None:
    enforce, hook = bench.parts.enforcement.enforce, bench.hook
    ok, bad = lease("bob", "read"), lease()
    hook.fail_apply.add(PAIR)
    failures = await enforce([], starting=[ok, bad])
    assert set(failures.apply) == {PAIR}
    assert hook.in_force == {("bob", "read")}
    hook.fail_remove.add(("bob", "read"))
    failures = await enforce([ok], ending=[ok])
    assert failures.remove == {("bob", "read"): "recording: remove refused"}
    # A plain failed removal is the caller's to pend (it knows the grants).
    assert bench.parts.removals.pending == {}


class _Stuck(RecordingEnforcer):
    """Applies halfway, then cannot be taken away either."""

    async def apply(self, cover: Cover) -> None:
        raise EnforcerError("half applied")

    async def remove(self, subject: str, action: str) -> None:
        raise EnforcerError("cannot remove")


async def test_an_apply_not_rolled_back_becomes_a_pending_removal(
    build: Callable[..., Bench],
) -> None:
    bench = build(enforcers=EnforcerSet([_Stuck("stuck")]))
    bench.parts.time.start(await bench.store.meta())
    failures = await bench.parts.enforcement.enforce([], starting=[lease()])
    assert set(failures.apply) == {PAIR}
    pending: dict[Pair, object] = dict(bench.parts.removals.pending)
    assert set(pending) == {PAIR}


async def test_a_removal_that_works_completes_one_owed_for_the_pair(bench: Bench) -> None:
    removals = bench.parts.removals
    await removals.pend(PAIR, ["grt-old"], "hook failed")
    held = lease()
    await bench.parts.enforcement.enforce([held], ending=[held])
    assert removals.pending == {}


async def test_holding_is_the_active_leases_that_hold_for_the_pairs_asked(bench: Bench) -> None:
    live, later = lease(), lease(start=timedelta(hours=1), applied=False)
    other = lease("bob")
    await bench.put(live, later, other)
    holding = bench.parts.enforcement.holding
    assert [x.grant_id for x in await holding([PAIR])] == [live.grant_id]
    assert [x.grant_id for x in await holding([other.pair])] == [other.grant_id]
    assert {x.grant_id for x in await holding([PAIR, other.pair])} == {
        live.grant_id,
        other.grant_id,
    }


async def test_enforcers_hear_when_only_the_deadline_moves(bench: Bench) -> None:
    enforce, hook = bench.parts.enforcement.enforce, bench.hook
    short, long = lease(length=timedelta(minutes=5)), lease(length=timedelta(hours=1))
    await enforce([], starting=[short])
    assert hook.windows[PAIR].not_after == short.not_after
    await enforce([short], starting=[long])
    assert hook.windows[PAIR].not_after == long.not_after
    await enforce([short, long], ending=[long])
    assert hook.windows[PAIR].not_after == short.not_after
    assert [op for op, _ in hook.calls] == ["apply", "extend", "extend"]


async def test_removal_listeners_hear_the_cause(bench: Bench) -> None:
    heard: list[tuple[Pair, str]] = []
    bench.parts.enforcement.on_removed.append(lambda pair, cause: heard.append((pair, cause)))
    held = lease()
    await bench.parts.enforcement.enforce([], starting=[held])
    await bench.parts.enforcement.enforce([held], ending=[held], cause="expired")
    assert heard == [(PAIR, "expired")]
