"""Removals still owed to the host: access whose lease ended but whose removal failed.

A revoke (or a snapshot, a fail-closed start, a half-done apply) ends a lease in the table first;
if the enforcers then cannot take the pair away, the pair is "pending removal". The lease itself
never grants anything again (it is not active: `check` refuses it, nothing re-applies it); the
pending removal records what is still owed to the host, per (subject, action), and survives
restarts in the lease database, so a restarted agent keeps retrying it.

Retries back off exponentially with jitter from `base` for `retries` attempts (the first one is
the revoke's own, inline); after that the grants are reported REVOKE_FAILED once (an outbox
event) and the removal is retried every `cap` seconds until it succeeds. Only a removal that
really succeeded reports the grants removed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from .leases import Pair
from .timekeeping import spread

# docs/promises.md (P4, parameters): "then retried in the background, at most every 10 minutes".
SLOW_RETRY = 600.0
MAX_GRANT_IDS = 64


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`retries`: attempts before the grants are reported REVOKE_FAILED (at least 1);
    `base`: the first delay, doubling; `cap`: the delay once the attempts are used up."""

    retries: int = 1
    base: float = 1.0
    cap: float = 60.0

    @classmethod
    def from_settings(cls, retries: int, base: float) -> RetryPolicy:
        """The agent's `remove_retries` and `remove_retry_base`: after the attempts, retry every
        base * 2^retries, at most every 10 minutes (1 s doubling to 60 s without a base)."""
        retries = max(1, retries)
        if not base:
            return cls(retries, 1.0, 60.0)
        return cls(retries, base, min(SLOW_RETRY, base * 2.0**retries))

    def delay(self, attempts: int, rand: float) -> float:
        """Seconds before the next attempt after `attempts` failed ones, +-50 %."""
        if attempts >= self.retries:
            return spread(self.cap, rand=rand)
        return spread(min(self.cap, self.base * 2.0 ** max(0, attempts - 1)), rand=rand)


@dataclass(frozen=True, slots=True)
class Removal:
    pair: Pair
    # The grants whose end this removal completes ("" entries never: drift has none).
    grant_ids: tuple[str, ...]
    # Failed attempts so far.
    attempts: int
    next_at: datetime
    since: datetime
    error: str = ""
    # The REVOKE_FAILED event was written (the attempts ran out).
    reported: bool = False


def first_failure(
    pair: Pair,
    grant_ids: tuple[str, ...],
    *,
    now: datetime,
    error: str,
    policy: RetryPolicy,
    rand: float,
    existing: Removal | None = None,
) -> Removal:
    """A removal of `pair` failed for the end of `grant_ids`; merged into a pending one, if any
    (its schedule is kept: the new failure is one more attempt)."""
    if existing is not None:
        merged = tuple(dict.fromkeys((*existing.grant_ids, *grant_ids)))[-MAX_GRANT_IDS:]
        return failed_again(
            replace(existing, grant_ids=merged), now=now, error=error, policy=policy, rand=rand
        )
    return Removal(
        pair=pair,
        grant_ids=tuple(dict.fromkeys(g for g in grant_ids if g))[-MAX_GRANT_IDS:],
        attempts=1,
        next_at=now + timedelta(seconds=policy.delay(1, rand)),
        since=now,
        error=error,
    )


def failed_again(
    removal: Removal, *, now: datetime, error: str, policy: RetryPolicy, rand: float
) -> Removal:
    attempts = removal.attempts + 1
    return replace(
        removal,
        attempts=attempts,
        next_at=now + timedelta(seconds=policy.delay(attempts, rand)),
        error=error,
    )


def is_due(removal: Removal, now: datetime, *, policy: RetryPolicy) -> bool:
    """Time to try again. A next attempt further ahead than the policy allows (scheduled by a
    wall clock that was ahead then) is due now."""
    return removal.next_at <= now or removal.next_at > now + timedelta(seconds=policy.cap * 1.5)


def needs_report(removal: Removal, policy: RetryPolicy) -> bool:
    """The attempts ran out and the grants were not reported REVOKE_FAILED yet."""
    return removal.attempts >= policy.retries and not removal.reported and bool(removal.grant_ids)
