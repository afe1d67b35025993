"""The token buckets behind request and enrollment limits: in memory on a fake monotonic clock,
and shared by replicas through PostgreSQL."""

from __future__ import annotations

from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path

import pytest

from jitmesh import Client, NotFoundError, RateLimitedError
from server.app import Coordinator
from server.domain.errors import InvalidArgument, RateLimited
from server.domain.governance import certificate_serial
from server.rpc.limits import RateLimiter, peer_host
from tests.server.helpers import TOKENS
from tests.store.test_fence import replica as build_replica
from tests.support import postgres

MIN = timedelta(minutes=1)


class Ticks:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_burst_then_the_rate_and_only_the_first_refusal_of_a_run_is_marked() -> None:
    ticks = Ticks()
    limiter = RateLimiter(rate=2.0, burst=3, monotonic=ticks)
    for _ in range(3):
        await limiter.take("10.0.0.7")
    firsts = []
    for _ in range(3):
        with pytest.raises(RateLimited) as refused:
            await limiter.take("10.0.0.7")
        firsts.append(refused.value.first)
    assert firsts == [True, False, False]
    # Another caller has its own bucket.
    await limiter.take("10.0.0.8")
    # Half a second at 2/s refills one call; the next refusal starts a new run.
    ticks.now += 0.5
    await limiter.take("10.0.0.7")
    with pytest.raises(RateLimited) as again:
        await limiter.take("10.0.0.7")
    assert again.value.first
    # Never more than the burst, however long the caller waited.
    ticks.now += 3600
    for _ in range(3):
        await limiter.take("10.0.0.7")
    with pytest.raises(RateLimited):
        await limiter.take("10.0.0.7")


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.7:51234", "10.0.0.7"),
        ("ipv6:[::1]:51234", "::1"),
        ("ipv6:[2001:db8::5]:443", "2001:db8::5"),
        ("unix:/run/jitmesh.sock", "unix:/run/jitmesh.sock"),
        ("", ""),
    ],
)
def test_the_peer_address_without_its_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host


@pytest.mark.parametrize(
    ("typed", "stored"),
    [
        ("1A2B", "1a2b"),
        ("0x1a2b", "1a2b"),
        ("00:1A:2B", "1a2b"),
        (" 1a2b ", "1a2b"),
        ("0", "0"),
    ],
)
def test_certificate_serials_have_one_spelling(typed: str, stored: str) -> None:
    assert certificate_serial(typed) == stored


@pytest.mark.parametrize("typed", ["", "0x", "xyz", "1" * 41, "12;DROP TABLE users", "-1"])
def test_bad_serials_are_refused_without_echo(typed: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        certificate_serial(typed)
    assert not typed or typed not in refused.value.message


async def test_replicas_on_postgresql_share_each_callers_request_budget(tmp_path: Path) -> None:
    """Two coordinators built on one PostgreSQL schema (replicas in one process, real gRPC):
    the budget alice spent on ra is spent on rb too, and the refusal reaches the SDK."""
    async with postgres.fresh_schema() as dsn, AsyncExitStack() as stack:
        replicas: list[Coordinator] = []
        for name in ("ra", "rb"):
            built = await build_replica(tmp_path, dsn, name, request_rate=0.001, request_burst=2)
            stack.push_async_callback(built.stop)
            replicas.append(built)
        await replicas[0].identity.ensure_user("alice", ["developers"], TOKENS["alice"])
        on = []
        for replica in replicas:
            client = await Client.connect(
                f"127.0.0.1:{replica.port}", token=TOKENS["alice"], timeout=10.0
            )
            stack.push_async_callback(client.close)
            on.append(client)
        # Two calls within the burst (each refused for its own reason: no such agent) on ra...
        for _ in range(2):
            with pytest.raises(NotFoundError):
                await on[0].create_request(agent="web-9", action="logs", duration=MIN)
        # ...and the third, on rb, finds the budget spent (a per-replica limit would allow it).
        with pytest.raises(RateLimitedError):
            await on[1].create_request(agent="web-9", action="logs", duration=MIN)
        with pytest.raises(RateLimitedError):
            await on[0].create_request(agent="web-9", action="logs", duration=MIN)
        assert [r.limiters["requests"].refused for r in replicas] == [1, 1]
