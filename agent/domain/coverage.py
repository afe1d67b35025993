"""Reference counting of (subject, action) pairs.

Overlapping grants for the same subject and action share one pair on the host: a pair is applied
when the first lease that needs it starts and removed when the last one that holds it ends.
Everything is derived from the leases themselves (which hold their pair), so there is no counter
to drift away from the table.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Set
from dataclasses import dataclass

from .leases import Lease, Pair


@dataclass(frozen=True, slots=True)
class PairChanges:
    apply: frozenset[Pair]
    remove: frozenset[Pair]


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
    before = {lease.pair for lease in holders}
    after = {lease.pair for lease in holders if lease.grant_id not in end_ids}
    after |= {lease.pair for lease in starters}
    return PairChanges(
        apply=frozenset({lease.pair for lease in starters} - before),
        remove=frozenset({lease.pair for lease in ending if lease.holds} - after),
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
