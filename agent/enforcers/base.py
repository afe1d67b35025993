"""The enforcer interface, and the ordered set of enforcers an agent runs.

An enforcer puts one (subject, action) pair in force on the host or takes it away. `apply` gets
the pair's `Cover`: the live grants covering it as one window (the longest-lasting grant's id,
`not_before`, and `not_after`, the latest deadline among them), so an enforcer that can make the
host itself refuse access after a time (sudo's NOTAFTER, OpenSSH's expiry-time) writes exactly
that deadline. `extend` is called when only that deadline moves (an extension, an overlapping
grant that lasts longer starting, or the longest one ending while another still covers the
pair): never a remove and a second apply. `apply` and `remove` are idempotent: applying a pair
that is in force (with its current window) or removing one that is not succeeds. `observe`
reports the pairs the enforcer sees in force, for the reconcile. Failures raise
`EnforcerError` (agent.domain.errors) and nothing else. Reference counting is not an enforcer's
business: the engine (`agent.engine.enforcement`) calls `apply` for a pair's first grant and
`remove` after its last.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from agent.domain.coverage import Cover, DriftMode
from agent.domain.errors import ApplyFailed, EnforcerError
from agent.domain.leases import Pair

log = logging.getLogger(__name__)


class Enforcer(Protocol):
    @property
    def name(self) -> str: ...

    async def apply(self, cover: Cover) -> None: ...

    async def extend(self, cover: Cover) -> None: ...

    async def remove(self, subject: str, action: str) -> None: ...

    async def observe(self) -> set[Pair]: ...


class EnforcerSet:
    """All configured enforcers, applied in order, all or nothing. `drift`: per enforcer (in
    the same order), what the drift reconcile does with access no lease holds (default remove)."""

    def __init__(
        self, enforcers: Sequence[Enforcer], *, drift: Sequence[DriftMode] | None = None
    ) -> None:
        self.enforcers = tuple(enforcers)
        modes = tuple(drift) if drift is not None else (DriftMode.REMOVE,) * len(self.enforcers)
        if len(modes) != len(self.enforcers):
            raise ValueError("one drift mode per enforcer")
        self.drift = modes
        # Told of every failed enforcer call, as (enforcer kind, operation): the metrics count
        # them (agent/metrics.py). Every call to an enforcer goes through this class for that.
        self.on_failure: Callable[[str, str], None] | None = None

    def _failed(self, enforcer: Enforcer, operation: str) -> None:
        if self.on_failure is not None:
            # `exec:NAME` enforcers are one kind: the label stays one of a few values.
            self.on_failure(enforcer.name.partition(":")[0], operation)

    async def apply_one(self, enforcer: Enforcer, cover: Cover) -> None:
        try:
            await enforcer.apply(cover)
        except EnforcerError:
            self._failed(enforcer, "apply")
            raise

    async def extend_one(self, enforcer: Enforcer, cover: Cover) -> None:
        try:
            await enforcer.extend(cover)
        except EnforcerError:
            self._failed(enforcer, "extend")
            raise

    async def remove_one(self, enforcer: Enforcer, pair: Pair) -> None:
        try:
            await enforcer.remove(*pair)
        except EnforcerError:
            self._failed(enforcer, "remove")
            raise

    async def observe_one(self, enforcer: Enforcer) -> set[Pair]:
        try:
            return await enforcer.observe()
        except EnforcerError:
            self._failed(enforcer, "observe")
            raise

    async def apply(self, cover: Cover) -> None:
        """Apply `cover` with every enforcer. If one fails, the ones that ran (the failing one
        too: it may have got halfway) are removed again and `ApplyFailed` is raised."""
        ran: list[Enforcer] = []
        for enforcer in self.enforcers:
            ran.append(enforcer)
            try:
                await self.apply_one(enforcer, cover)
            except EnforcerError as exc:
                rolled_back = await self._undo(ran, cover.pair)
                raise ApplyFailed(exc, rolled_back=rolled_back) from exc

    async def extend(self, cover: Cover) -> None:
        """Move the pair's deadline with every enforcer; every one is tried, then the first
        error is raised."""
        errors: list[EnforcerError] = []
        for enforcer in self.enforcers:
            try:
                await self.extend_one(enforcer, cover)
            except EnforcerError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    async def remove(self, pair: Pair) -> None:
        """Remove `pair` with every enforcer, last first. Every enforcer is tried even when an
        earlier one fails (take away as much access as possible); then the first error is raised."""
        errors = await self._remove_each(self.enforcers, pair)
        if errors:
            raise errors[0]

    async def _undo(self, ran: Sequence[Enforcer], pair: Pair) -> bool:
        errors = await self._remove_each(ran, pair)
        return not errors

    async def _remove_each(self, enforcers: Sequence[Enforcer], pair: Pair) -> list[EnforcerError]:
        errors: list[EnforcerError] = []
        for enforcer in reversed(enforcers):
            try:
                await self.remove_one(enforcer, pair)
            except EnforcerError as exc:
                log.warning(
                    "remove failed",
                    extra={
                        "enforcer": enforcer.name,
                        "subject": pair[0],
                        "action": pair[1],
                        "error": str(exc),
                    },
                )
                errors.append(exc)
        return errors
