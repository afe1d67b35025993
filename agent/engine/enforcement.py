"""Enforcement: the one place where leases become changes on the host.

Overlapping leases for the same pair are reference-counted here (`pair_changes`): a pair is
applied when its first holder starts and removed when its last holder ends, never otherwise; when
the holders change but the pair stays, its enforcers hear of the new deadline (`extend`) if it
moved. Whoever must know that a pair's access ended (the sessions started through `exec`) listens
here too: `on_removed` is told after each pair's real removal, with its cause.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from agent.domain.coverage import Cover, covers, pair_changes
from agent.domain.errors import ApplyFailed, EnforcerError
from agent.domain.leases import Lease, Pair
from agent.enforcers.base import EnforcerSet
from agent.engine.removals import Removals
from agent.engine.shared import cut
from agent.store.base import LeaseStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Failures:
    apply: dict[Pair, str]
    remove: dict[Pair, str]


class Enforcement:
    def __init__(
        self,
        *,
        store: LeaseStore,
        enforcers: EnforcerSet,
        removals: Removals,
        now: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._enforcers = enforcers
        self._removals = removals
        self._now = now
        # Told (synchronously: schedule, never wait) after a pair's access was really removed.
        self.on_removed: list[Callable[[Pair, str], None]] = []

    async def holding(self, pairs: Iterable[Pair]) -> list[Lease]:
        """The leases in force for `pairs`: all `enforce` needs to count the holders of the
        pairs its starting and ending leases touch (other pairs' leases change nothing there)."""
        return [lease for lease in await self._store.active_leases_of(pairs) if lease.holds]

    async def enforce(
        self,
        holding: Sequence[Lease],
        *,
        starting: Sequence[Lease] = (),
        ending: Sequence[Lease] = (),
        cause: str = "revoked",
    ) -> Failures:
        """Apply and remove the pairs that starting and ending leases change (ref-counted), and
        move the deadline of pairs that stay but whose window moved. `cause` says why leases end
        (revoked, expired, offline, ...), for those told of removals."""
        changes = pair_changes(holding, starting=starting, ending=ending)
        apply_failed: dict[Pair, str] = {}
        unrolled: set[Pair] = set()
        for pair in sorted(changes.apply):
            try:
                await self._enforcers.apply(changes.after[pair])
            except EnforcerError as exc:
                apply_failed[pair] = cut(str(exc))
                if isinstance(exc, ApplyFailed) and not exc.rolled_back:
                    # Partly in place: keep trying to take it away.
                    unrolled.add(pair)
                log.warning(
                    "apply failed", extra={"subject": pair[0], "action": pair[1], "error": str(exc)}
                )
        if apply_failed:
            # Leases that failed to start hold nothing: recount before removing.
            started = [lease for lease in starting if lease.pair not in apply_failed]
            changes = pair_changes(holding, starting=started, ending=ending)
        remove_failed: dict[Pair, str] = {}
        for pair in sorted(changes.remove):
            try:
                await self._enforcers.remove(pair)
            except EnforcerError as exc:
                remove_failed[pair] = cut(str(exc))
                continue
            # A removal owed for an earlier end of this pair (parked while a newer lease held
            # it) is done now too.
            await self._removals.removed(pair, self._now())
            self._tell_removed(pair, cause)
        for pair in sorted(changes.moved):
            await self._extend(changes.after[pair])
        for pair, error in apply_failed.items():
            if pair in unrolled:
                await self._removals.pend(pair, (), error)
        return Failures(apply_failed, remove_failed)

    async def moved(self, pairs: Iterable[Pair]) -> None:
        """The window of `pairs` may have moved in the table (a grant's `not_after` changed in
        place: an extension): tell the enforcers the pair's deadline as the table now has it."""
        moved = set(pairs)
        now_covering = covers(await self.holding(moved))
        for pair in sorted(moved):
            cover = now_covering.get(pair)
            if cover is not None:
                await self._extend(cover)

    async def _extend(self, cover: Cover) -> None:
        try:
            await self._enforcers.extend(cover)
        except EnforcerError as exc:
            # The host keeps the old deadline: earlier is the safe side; later is still ended on
            # time by the expiry loop (the host's own deadline is the second lock, not the first).
            log.warning(
                "deadline not moved",
                extra={"subject": cover.subject, "action": cover.action, "error": str(exc)},
            )

    def _tell_removed(self, pair: Pair, cause: str) -> None:
        for listener in self.on_removed:
            try:
                listener(pair, cause)
            except Exception:
                log.exception("a removal listener failed", extra={"subject": pair[0]})
