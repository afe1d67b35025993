"""Rate-limit buckets in the store (server/rpc/limits.py, SharedRateLimiter), on every store: a
burst, then the rate; the first refusal of a run is told apart; a clock that went back refills
nothing; full buckets are forgotten. On PostgreSQL, replicas (separate store objects, separate
pools) taking from one bucket at once share it: together they never take more than it holds."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from jitmesh.clock import FakeClock
from server.domain.errors import RateLimited
from server.domain.ports import Store
from server.rpc.limits import PRUNE_EVERY, SharedRateLimiter
from server.store.postgres import PostgresStore
from tests.server.helpers import T0
from tests.store.conftest import Opener
from tests.support import postgres

S = timedelta(seconds=1)


async def test_a_burst_then_the_rate_per_caller(store: Store) -> None:
    taken = [await store.take_token("requests", "alice", 2.0, 3, T0) for _ in range(6)]
    # Three allowed, then refusals counted in a row (1: the first of the run).
    assert taken == [0, 0, 0, 1, 2, 3]
    # Another caller, and the same caller under another limiter, have their own buckets.
    assert await store.take_token("requests", "bob", 2.0, 3, T0) == 0
    assert await store.take_token("enroll_peer", "alice", 2.0, 3, T0) == 0
    # Half a second at 2/s refills one call; the next refusal starts a new run.
    assert await store.take_token("requests", "alice", 2.0, 3, T0 + S / 2) == 0
    assert await store.take_token("requests", "alice", 2.0, 3, T0 + S / 2) == 1
    # Never more than the burst, however long the caller waited.
    later = T0 + timedelta(hours=1)
    assert [await store.take_token("requests", "alice", 2.0, 3, later) for _ in range(4)] == [
        0,
        0,
        0,
        1,
    ]


async def test_a_clock_that_went_back_refills_nothing(store: Store) -> None:
    for _ in range(2):
        assert await store.take_token("requests", "alice", 1.0, 2, T0 + 10 * S) == 0
    # A replica whose clock runs 10 s behind: no tokens from "negative" time, none taken away.
    assert await store.take_token("requests", "alice", 1.0, 2, T0) == 1
    # From the latest instant seen (T0 + 10 s), one second refills one call.
    assert await store.take_token("requests", "alice", 1.0, 2, T0 + 11 * S) == 0
    assert await store.take_token("requests", "alice", 1.0, 2, T0 + 11 * S) == 1


async def test_full_buckets_are_forgotten_and_the_others_kept(store: Store) -> None:
    await store.take_token("enroll_peer", "10.0.0.7", 1.0, 5, T0)
    for _ in range(5):
        await store.take_token("enroll_peer", "10.0.0.8", 1.0, 5, T0 + 4 * S)
    await store.take_token("requests", "alice", 1.0, 5, T0)
    # At T0 + 5 s: 10.0.0.7 is full again (4 + 5 s * 1/s), 10.0.0.8 holds 1 of 5.
    assert await store.forget_full_buckets("enroll_peer", T0 + 5 * S) == 1
    # Forgotten is the same as full: five calls at once.
    assert [
        await store.take_token("enroll_peer", "10.0.0.7", 1.0, 5, T0 + 5 * S) for _ in range(6)
    ] == [0] * 5 + [1]
    # Kept: 10.0.0.8 has one call left.
    assert await store.take_token("enroll_peer", "10.0.0.8", 1.0, 5, T0 + 5 * S) == 0
    assert await store.take_token("enroll_peer", "10.0.0.8", 1.0, 5, T0 + 5 * S) == 1
    # Another limiter's buckets are not touched.
    assert await store.take_token("requests", "alice", 1.0, 5, T0) == 0


async def test_the_shared_limiter_refuses_with_the_first_of_a_run_marked(store: Store) -> None:
    clock = FakeClock(T0)
    limiter = SharedRateLimiter("requests", 1.0, 2, store, clock)
    await limiter.take("alice")
    await limiter.take("alice")
    firsts = []
    for _ in range(2):
        with pytest.raises(RateLimited) as refused:
            await limiter.take("alice")
        firsts.append(refused.value.first)
    assert firsts == [True, False]
    assert limiter.refused == 2
    await clock.advance(S)
    await limiter.take("alice")


async def test_the_shared_limiter_forgets_full_buckets_as_it_goes(store: Store) -> None:
    clock = FakeClock(T0)
    limiter = SharedRateLimiter("enroll_peer", 1.0, 2, store, clock)
    await limiter.take("10.0.0.1")
    await clock.advance(timedelta(minutes=1))
    for k in range(PRUNE_EVERY - 1):
        await limiter.take(f"10.1.{k // 250}.{k % 250}")
    # The PRUNE_EVERY-th call deleted the buckets full again: the first caller's (a minute old)
    # and none of the others (each took one of two tokens this instant).
    assert await store.forget_full_buckets("enroll_peer", clock.now()) == 0
    assert await store.take_token("enroll_peer", "10.0.0.1", 1.0, 2, clock.now()) == 0
    assert await store.take_token("enroll_peer", "10.0.0.1", 1.0, 2, clock.now()) == 0
    assert await store.take_token("enroll_peer", "10.0.0.1", 1.0, 2, clock.now()) == 1


async def test_replicas_taking_from_one_bucket_at_once_share_it_on_postgresql() -> None:
    async with postgres.fresh_schema() as dsn:
        replicas = [await PostgresStore.open(dsn, min_size=1, max_size=4) for _ in range(3)]
        try:
            # 3 replicas x 4 tasks x 5 calls (60) at one instant: a bucket of 7 gives 7 calls in
            # all, whichever replica asked (a per-replica limit would have given 21).
            async def calls(store: Store) -> list[int]:
                return [await store.take_token("requests", "alice", 0.001, 7, T0) for _ in range(5)]

            results = await asyncio.gather(*(calls(r) for r in replicas for _ in range(4)))
            refusals = sorted(n for got in results for n in got)
            assert refusals.count(0) == 7
            # Every refusal has its own place in the run: no two callers saw the same count.
            assert refusals[7:] == list(range(1, 54))
        finally:
            for store in replicas:
                await store.close()


async def test_a_bucket_used_on_one_replica_is_spent_on_another(reopen: Opener) -> None:
    a = await reopen()
    b = await reopen()
    assert [await a.take_token("enroll_overall", "*", 0.5, 2, T0) for _ in range(2)] == [0, 0]
    # On SQLite the same file reopened (a restart); on PostgreSQL a second replica.
    assert await b.take_token("enroll_overall", "*", 0.5, 2, T0) == 1
    assert await b.take_token("enroll_overall", "*", 0.5, 2, T0 + 2 * S) == 0
