"""Enforcers for tests and benchmarks (never shipped): the agent's `Enforcer` interface with
nothing on the host behind it."""

from __future__ import annotations

import time
from collections.abc import Callable

from agent.domain.coverage import Cover
from agent.domain.leases import Pair


class MemoryEnforcer:
    """Pairs in force, in a set; every apply and remove is logged with its monotonic time."""

    def __init__(self, name: str = "memory", clock: Callable[[], float] = time.monotonic) -> None:
        self._name = name
        self._clock = clock
        self.in_force: set[Pair] = set()
        self.history: list[tuple[float, str, Pair]] = []

    @property
    def name(self) -> str:
        return self._name

    async def apply(self, cover: Cover) -> None:
        self.in_force.add(cover.pair)
        self.history.append((self._clock(), "apply", cover.pair))

    async def extend(self, cover: Cover) -> None:
        pass

    async def remove(self, subject: str, action: str) -> None:
        self.in_force.discard((subject, action))
        self.history.append((self._clock(), "remove", (subject, action)))

    async def observe(self) -> set[Pair]:
        return set(self.in_force)
