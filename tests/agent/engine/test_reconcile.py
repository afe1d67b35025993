"""Reconcile: the host made to match the table (missing access applied, drift removed or
reported once), crash leftovers adopted, owed removals left to the retry loop."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from agent.domain.coverage import DriftMode
from agent.domain.leases import EventKind
from agent.enforcers.base import EnforcerSet
from tests.agent.factories import lease
from tests.agent.fakes import RecordingEnforcer

from .conftest import Bench

PAIR = ("alice", "deploy")
STRAY = ("mallory", "root")


async def test_missing_access_is_applied_and_drift_removed(bench: Bench) -> None:
    await bench.put(lease())
    bench.hook.in_force.add(STRAY)
    await bench.parts.reconciler.reconcile()
    assert bench.hook.in_force == {PAIR}
    assert [(k, d) for k, _, d in await bench.kinds()] == [
        (EventKind.DRIFT_REMOVED, {"enforcer": "recording"})
    ]


async def test_report_only_drift_is_audited_once_and_left(build: Callable[..., Bench]) -> None:
    hook = RecordingEnforcer()
    bench = build(hook=hook, enforcers=EnforcerSet([hook], drift=[DriftMode.REPORT]))
    bench.parts.time.start(await bench.store.meta())
    hook.in_force.add(STRAY)
    for _ in range(3):
        await bench.parts.reconciler.reconcile()
    assert hook.in_force == {STRAY}
    assert [k for k, _, _ in await bench.kinds()] == [EventKind.DRIFT_REPORTED]
    # Gone, then back: reported again.
    hook.in_force.clear()
    await bench.parts.reconciler.reconcile()
    hook.in_force.add(STRAY)
    await bench.parts.reconciler.reconcile()
    assert [k for k, _, _ in await bench.kinds()].count(EventKind.DRIFT_REPORTED) == 2


async def test_a_pair_with_a_removal_owed_is_not_drift(bench: Bench) -> None:
    bench.hook.in_force.add(STRAY)
    await bench.parts.removals.pend(STRAY, ["grt-1"], "hook failed")
    await bench.parts.reconciler.reconcile()
    assert bench.hook.count("remove", STRAY) == 0


async def test_a_pair_that_cannot_be_applied_fails_its_leases(bench: Bench) -> None:
    held = lease()
    await bench.put(held)
    bench.hook.fail_apply.add(PAIR)
    await bench.parts.reconciler.reconcile()
    stored = await bench.store.lease(held.grant_id)
    assert stored is not None
    assert not stored.holds
    assert [(k, d.get("while")) for k, _, d in await bench.kinds()] == [
        (EventKind.GRANT_APPLY_FAILED, "reconcile")
    ]


async def test_access_found_in_force_at_start_is_adopted_not_applied_again(bench: Bench) -> None:
    waiting = lease(applied=False)
    await bench.put(waiting)
    bench.hook.in_force.add(PAIR)
    await bench.parts.reconciler.adopt_applied()
    stored = await bench.store.lease(waiting.grant_id)
    assert stored is not None
    assert stored.applied_at is not None
    assert bench.hook.count("apply", PAIR) == 0


async def test_the_periodic_reconcile_runs_when_due(build: Callable[..., Bench]) -> None:
    bench = build(reconcile_every=30.0)
    bench.parts.time.start(await bench.store.meta())
    reconciler = bench.parts.reconciler
    start = bench.clock.monotonic()
    bench.hook.in_force.add(STRAY)
    assert await reconciler.when_due(start + 10) == 20.0
    assert STRAY in bench.hook.in_force
    assert await reconciler.when_due(start + 30) == 30.0
    assert STRAY not in bench.hook.in_force
    assert await build().parts.reconciler.when_due(start + 100) is None


async def test_only_leases_that_hold_are_applied(bench: Bench) -> None:
    await bench.put(lease(start=timedelta(hours=1), applied=False))
    await bench.parts.reconciler.reconcile()
    assert bench.hook.in_force == set()
