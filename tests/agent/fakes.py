"""An in-memory enforcer that records calls and fails on demand (for what a real one cannot
show: failures at a chosen step)."""

from __future__ import annotations

from agent.domain.coverage import Cover
from agent.domain.errors import EnforcerError
from agent.domain.leases import Pair


class RecordingEnforcer:
    def __init__(
        self, name: str = "recording", journal: list[tuple[str, str]] | None = None
    ) -> None:
        self._name = name
        # Shared between enforcers, to see the order across them: (name, operation).
        self.journal = journal if journal is not None else []
        self.in_force: set[Pair] = set()
        self.calls: list[tuple[str, Pair]] = []
        self.fail_apply: set[Pair] = set()
        self.fail_remove: set[Pair] = set()
        self.fail_observe = False
        # The window each pair was last applied or extended with.
        self.windows: dict[Pair, Cover] = {}

    @property
    def name(self) -> str:
        return self._name

    async def apply(self, cover: Cover) -> None:
        subject, action = cover.pair
        self.calls.append(("apply", (subject, action)))
        self.journal.append((self._name, "apply"))
        if (subject, action) in self.fail_apply:
            raise EnforcerError(f"{self._name}: apply refused")
        self.in_force.add((subject, action))
        self.windows[cover.pair] = cover

    async def extend(self, cover: Cover) -> None:
        self.calls.append(("extend", cover.pair))
        self.windows[cover.pair] = cover

    async def remove(self, subject: str, action: str) -> None:
        self.calls.append(("remove", (subject, action)))
        self.journal.append((self._name, "remove"))
        if (subject, action) in self.fail_remove:
            raise EnforcerError(f"{self._name}: remove refused")
        self.in_force.discard((subject, action))

    async def observe(self) -> set[Pair]:
        if self.fail_observe:
            raise EnforcerError(f"{self._name}: cannot observe")
        return set(self.in_force)

    def count(self, op: str, pair: Pair) -> int:
        return self.calls.count((op, pair))
