"""Reference counting of (subject, action) pairs.

Overlapping grants for the same subject and action share one pair on the host: a pair is applied
when the first lease that needs it starts and removed when the last one that holds it ends.
Everything is derived from the leases themselves (which hold their pair), so there is no counter
to drift away from the table.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Set
from dataclasses import dataclass, field
from datetime import datetime

from .leases import Lease, Pair


@dataclass(frozen=True, slots=True)
class PairChanges:
    apply: frozenset[Pair]
    remove: frozenset[Pair]
    # Pairs in force before and after whose window (latest not_after) moved: their host-native
    # deadline follows, with no remove and no second apply.
    moved: frozenset[Pair] = frozenset()
    # The window of every pair in force afterwards.
    after: dict[Pair, Cover] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Cover:
    """What an enforcer puts in force for one pair: the live leases covering it, as one window.

    `not_after` is the latest `not_after` of those leases (a host-native deadline, such as sudo's
    NOTAFTER, always equals it); `grant_id` names the lease that lasts longest; `not_before`
    the earliest start among them."""

    subject: str
    action: str
    grant_id: str
    not_before: datetime
    not_after: datetime

    @property
    def pair(self) -> Pair:
        return (self.subject, self.action)


def covers(leases: Iterable[Lease]) -> dict[Pair, Cover]:
    """The window each pair is covered for by `leases` (all of them, whether started or not:
    callers pass the leases that hold, or are starting)."""
    found: dict[Pair, Cover] = {}
    for lease in leases:
        old = found.get(lease.pair)
        if old is None:
            found[lease.pair] = Cover(
                lease.subject, lease.action, lease.grant_id, lease.not_before, lease.not_after
            )
            continue
        longest = lease if lease.not_after > old.not_after else None
        found[lease.pair] = Cover(
            lease.subject,
            lease.action,
            longest.grant_id if longest else old.grant_id,
            min(old.not_before, lease.not_before),
            longest.not_after if longest else old.not_after,
        )
    return found


def held_pairs(leases: Iterable[Lease]) -> frozenset[Pair]:
    """The pairs that should be in force on the host: those some active lease holds."""
    return frozenset(lease.pair for lease in leases if lease.holds)


def pair_changes(
    holding: Iterable[Lease],
    *,
    starting: Iterable[Lease] = (),
    ending: Iterable[Lease] = (),
) -> PairChanges:
    """Which pairs to apply and remove when `starting` leases begin and `ending` ones end.

    `holding` are the leases whose pair is in force now (`Lease.holds`); `ending` may include some
    of them. A pair is applied only if nobody held it before, and removed only if a lease that
    held it ends and nobody holds it afterwards, so ending one of two overlapping leases never
    takes access from the other, and ending a lease that never started removes nothing.
    """
    holders = [lease for lease in holding if lease.holds]
    starters = list(starting)
    end_ids = {lease.grant_id for lease in ending}
    before = covers(holders)
    start_ids = {lease.grant_id for lease in starters}
    remaining = [lease for lease in holders if lease.grant_id not in end_ids | start_ids]
    after = covers([*remaining, *starters])
    moved = {
        pair
        for pair, cover in after.items()
        if pair in before and before[pair].not_after != cover.not_after
    }
    return PairChanges(
        apply=frozenset({lease.pair for lease in starters} - before.keys()),
        remove=frozenset({lease.pair for lease in ending if lease.holds} - after.keys()),
        moved=frozenset(moved),
        after=after,
    )


class DriftMode(enum.StrEnum):
    """What the drift reconcile does with access an enforcer shows that no lease holds."""

    # Take it away (and audit it).
    REMOVE = "remove"
    # Leave it, and audit it (once per pair until it is gone): for hosts where another tool also
    # manages the same access. Expired access is still never brought back.
    REPORT = "report"


@dataclass(frozen=True, slots=True)
class Reconcile:
    apply: frozenset[Pair]
    remove: frozenset[Pair]


def reconcile(desired: Set[Pair], observed: Set[Pair]) -> Reconcile:
    """Bring what an enforcer observes on the host in line with what the lease table says."""
    return Reconcile(apply=frozenset(desired - observed), remove=frozenset(observed - desired))
