"""The token buckets behind request and enrollment limits, on a fake monotonic clock."""

from __future__ import annotations

import pytest

from server.domain.errors import InvalidArgument, RateLimited
from server.domain.governance import certificate_serial
from server.rpc.limits import RateLimiter, peer_host


class Ticks:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_rate_and_only_the_first_refusal_of_a_run_is_marked() -> None:
    ticks = Ticks()
    limiter = RateLimiter(rate=2.0, burst=3, monotonic=ticks)
    for _ in range(3):
        limiter.take("10.0.0.7")
    firsts = []
    for _ in range(3):
        with pytest.raises(RateLimited) as refused:
            limiter.take("10.0.0.7")
        firsts.append(refused.value.first)
    assert firsts == [True, False, False]
    # Another caller has its own bucket.
    limiter.take("10.0.0.8")
    # Half a second at 2/s refills one call; the next refusal starts a new run.
    ticks.now += 0.5
    limiter.take("10.0.0.7")
    with pytest.raises(RateLimited) as again:
        limiter.take("10.0.0.7")
    assert again.value.first
    # Never more than the burst, however long the caller waited.
    ticks.now += 3600
    for _ in range(3):
        limiter.take("10.0.0.7")
    with pytest.raises(RateLimited):
        limiter.take("10.0.0.7")


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
