"""Delivery keeps up or pushes back (issue 16, item 5).

A grant command waits in its agent's log until the agent has applied it. The coordinator must
not answer "created" for a grant that will expire before its agent gets to it, so every new
grant command is weighed against its agent's undelivered commands (appended, not yet acked:
`Agent.last_seq - Agent.last_acked_seq`, from the store, shared by replicas) and refused with
`Overloaded` (RESOURCE_EXHAUSTED and a retry hint on the wire) beyond the agent's bound:

- never more than `max_undelivered` for one agent (a count: half the stream's queue, so a
  connected agent's accepted commands never overflow its queue and cut it off);
- for a connected agent, no more than it can apply within a quarter of the grant's duration
  (and within 5 s), at the apply rate measured from its acks while it was busy
  (`DeliveryRates`): a grant accepted with n commands before it is expected to be applied after
  about n / rate seconds; and none while its latest delivery took longer than that already (it
  slowed down since its rate was measured).

An agent that is not connected here gets the count bound only: its grants wait for it as
before (PENDING_DELIVERY), and its rate says nothing while it is away. The rates are this
process's measurement (the replica holding the agent's stream sees its acks); another replica
applies the count bound alone.

The rule is a prediction from the recent past: an agent that stalls after a grant was accepted
(a hook that hangs) can still let it expire queued; the bound keeps that backlog small.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

# Until an agent has been seen busy, it is assumed to apply this many commands per second (a
# real agent on this project's benchmark machine applies several hundred).
ASSUMED_RATE = 20.0
# How far back the measured rate looks (samples older than this weigh less than 1/e).
RATE_MEMORY = timedelta(seconds=2)
# The share of a grant's duration its delivery may take at most, and a bound for every grant:
# the rest is margin for an agent (or machine) that slows down after a grant was accepted.
DELIVERY_SHARE = 0.25
MAX_DELIVERY = timedelta(seconds=5)
# Retry hints stay within these bounds.
MIN_RETRY = timedelta(milliseconds=50)
MAX_RETRY = timedelta(seconds=10)
# An agent not connected here: try again after this long (it may be back by then).
AWAY_RETRY = timedelta(seconds=5)


@dataclass(frozen=True, slots=True)
class Pushback:
    """Why a command for `agent` is refused now, and when to try again."""

    agent: str
    undelivered: int
    limit: int
    retry_after: timedelta

    def message(self) -> str:
        return (
            f"agent {self.agent} has {self.undelivered} undelivered commands (limit {self.limit} "
            f"now); try again in {self.retry_after.total_seconds():.2f}s"
        )


class DeliveryRates:
    """Each agent's apply rate (commands per second) and its latest delivery time, measured
    from its acks.

    The rate counts only busy time: from one ack to the next, when the next acked command was
    already waiting at the first, the agent was working all along. Commands and busy seconds
    are summed with a decay (older samples weigh less, by `RATE_MEMORY`), and the rate is their
    ratio: acks that come in bursts (batched) neither inflate nor deflate it. The delivery time
    is how long the newest acked command took from its creation to its ack."""

    __slots__ = ("_agents",)

    def __init__(self) -> None:
        # agent -> [last ack at, decayed commands, decayed busy seconds, latest delivery seconds]
        self._agents: dict[str, list[Any]] = {}

    def acked(
        self,
        agent: str,
        count: int,
        oldest_created_at: datetime,
        newest_created_at: datetime,
        now: datetime,
    ) -> None:
        """`count` commands of `agent` acked at `now`, created between `oldest_created_at` and
        `newest_created_at`."""
        state = self._agents.get(agent)
        if state is None:
            # The first ack seen: the start of the first interval.
            self._agents[agent] = [
                now,
                0.0,
                0.0,
                max(0.0, (now - newest_created_at).total_seconds()),
            ]
            return
        last: datetime = state[0]
        state[0] = now
        state[3] = max(0.0, (now - newest_created_at).total_seconds())
        if count <= 0 or oldest_created_at > last:
            return  # idle in between: the gap says nothing about its speed
        seconds = (now - last).total_seconds()
        if seconds <= 0:
            state[1] += count  # in the same instant as the last: counted with the next gap
            return
        keep = math.exp(-seconds / RATE_MEMORY.total_seconds())
        state[1] = state[1] * keep + count
        state[2] = state[2] * keep + seconds

    def rate(self, agent: str) -> float | None:
        state = self._agents.get(agent)
        if state is None or state[2] <= 0:
            return None
        return float(state[1] / state[2])

    def latency(self, agent: str) -> float:
        """Seconds the newest acked command took to be delivered (0 when unknown)."""
        state = self._agents.get(agent)
        return 0.0 if state is None else float(state[3])

    def forget(self, agent: str) -> None:
        self._agents.pop(agent, None)


def pushback(
    agent: str,
    undelivered: int,
    duration: timedelta,
    *,
    connected: bool,
    rate: float | None,
    max_undelivered: int,
    latency: float = 0.0,
) -> Pushback | None:
    """Whether one more grant command of `duration` for `agent`, with `undelivered` commands
    ahead of it, is refused; None when it is accepted. `latency`: how long the agent's latest
    acked command took to be delivered."""
    limit = max_undelivered
    speed = rate if rate is not None and rate > 0 else ASSUMED_RATE
    budget = min(duration.total_seconds() * DELIVERY_SHARE, MAX_DELIVERY.total_seconds())
    slowed = False
    if connected:
        # n commands ahead are applied in about n / speed seconds.
        limit = max(1, min(limit, int(speed * budget)))
        if undelivered and latency > budget:
            # The agent slowed down since its rate was measured: its latest delivery already
            # took longer than this grant may wait. Nothing more until its backlog is gone.
            slowed = True
            limit = min(limit, undelivered)
    if undelivered < limit:
        return None
    if not connected:
        retry = AWAY_RETRY
    elif slowed:
        retry = timedelta(seconds=undelivered / speed)
    else:
        retry = timedelta(seconds=(undelivered - limit + 1) / speed)
    retry = min(MAX_RETRY, max(MIN_RETRY, retry))
    return Pushback(agent, undelivered, limit, retry)


class DeliveryGate:
    """The pushback rule with what it needs: the measured rates, the count bound, and whether
    the agent is connected here."""

    __slots__ = ("_connected", "max_undelivered", "rates")

    def __init__(
        self, rates: DeliveryRates, max_undelivered: int, connected: Callable[[str], bool]
    ) -> None:
        self.rates = rates
        self.max_undelivered = max_undelivered
        self._connected = connected

    def check(self, agent: str, undelivered: int, duration: timedelta) -> Pushback | None:
        return pushback(
            agent,
            undelivered,
            duration,
            connected=self._connected(agent),
            rate=self.rates.rate(agent),
            max_undelivered=self.max_undelivered,
            latency=self.rates.latency(agent),
        )
