"""How long an ended lease's row is kept in the lease table (pure: decided from the row and now).

Every ended row (removed, failed, tombstone) is kept `retention` after its end: `jitmesh-agent
check` and an operator reading the table see recent history. A row that refuses a late grant is
kept longer, until no copy of that grant can still arrive with its window open (P3, docs/
promises.md: a revoked grant is never re-applied):

- A row ended at or after its own `not_after` (expired): any copy of its grant is expired on
  arrival from then on; kept until `not_after` + the skew tolerance at least.
- Any other ended row (revoked, released, ended offline, by a snapshot, failed) and every
  tombstone (a revoke for a grant never seen, whose window is unknown): a copy of the grant may
  come late (a delayed or replayed command, a coordinator restored from a backup). Every copy
  was issued before the revoke, and the agent refuses a grant whose `not_after` lies more than
  `MAX_DURATION` ahead, so after `MAX_DURATION` + the skew tolerance (the agent's clock may be
  behind the coordinator's by that much) every copy is expired on arrival: kept until then.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from jitmesh.durations import MAX_DURATION

from .leases import Lease, LeaseState


def keep_until(lease: Lease, *, retention: timedelta, skew_tolerance: timedelta) -> datetime | None:
    """When `lease`'s row may be deleted; None for a row that must stay (an active lease)."""
    if lease.state is LeaseState.ACTIVE or lease.removed_at is None:
        return None
    ended_at = lease.removed_at
    if lease.state is not LeaseState.TOMBSTONE and ended_at >= lease.not_after:
        refuses_until = lease.not_after + skew_tolerance
    else:
        refuses_until = ended_at + MAX_DURATION + skew_tolerance
    return max(ended_at + retention, refuses_until)


def prunable(
    lease: Lease, now: datetime, *, retention: timedelta, skew_tolerance: timedelta
) -> bool:
    until = keep_until(lease, retention=retention, skew_tolerance=skew_tolerance)
    return until is not None and now >= until
