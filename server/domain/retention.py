"""Command-log retention: each agent's command log is truncated behind its acknowledged
position, periodically, so the log holds what agents have not acknowledged yet and little else.

What a resume needs stays: an agent resumes after min(last_applied, first_unacked - 1), and
every command after the first unacknowledged one is kept. An agent that comes back below the
truncated position (it lost state it had acknowledged: a restored backup of its lease table)
gets a snapshot instead of the commands it missed (FleetService.hello). The rule and the SQL
live in the store (`Tx.truncate_command_log`); this is the loop that runs it."""

from __future__ import annotations

import logging
from datetime import timedelta

from jitmesh import telemetry as t
from jitmesh.clock import Clock

from .ports import Store

log = logging.getLogger(__name__)

# Agents advanced and commands deleted per write transaction: short enough not to hold the
# store's writers up (one writer on SQLite; the audit head orders writers on PostgreSQL).
# Measured on 10,000 agents with 10 acked commands each (docs/operations.md, Retention):
# a batch takes 6-15 ms on SQLite and 70-84 ms on a vacuumed PostgreSQL (median; bench.retention).
BATCH = 1000


class CommandLogRetention:
    def __init__(self, store: Store, clock: Clock, every: timedelta, batch: int = BATCH) -> None:
        self._store = store
        self._clock = clock
        self._every = every
        self._batch = batch
        # Commands deleted by this process since it started (for tests and the logs).
        self.truncated = 0

    async def truncate(self) -> int:
        """One pass: batches until the log holds nothing more to truncate; how many went."""
        total = 0
        while True:
            step = await self._store.write(lambda tx: tx.truncate_command_log(self._batch))
            total += step.commands
            if step.agents < self._batch and step.commands < self._batch:
                break
        self.truncated += total
        return total

    async def run(self) -> None:
        """Truncate every `every`; a failing pass (the store away for a moment) is retried at
        the next one."""
        while True:
            await self._clock.sleep(self._every.total_seconds())
            try:
                deleted = await self.truncate()
            except Exception as exc:  # any store failure: the next pass tries again
                log.warning("command log retention failed: %s", type(exc).__name__)
                continue
            if deleted:
                log.info("command log truncated", extra={t.COUNT: deleted})
