"""What the engine's parts share: the one lock, the wake-up signals, and small helpers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from agent.domain.errors import StateError
from agent.domain.leases import Lease
from jitmesh.clock import Clock

log = logging.getLogger("agent.engine")

MAX_REASON = 256


class Shared:
    """The lock every change to the lease table and the host is made under (commands, sweeps,
    reconciles and the bookkeeping of background removals: one at a time), and the events that
    wake the loops."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        # Set when the outbox gains events or loses acknowledged ones (the link's sender waits).
        self.outbox_changed = asyncio.Event()
        # Set when the expiry loop must look at the table again before the wake it planned.
        self.leases_changed = asyncio.Event()
        # Set when the pending removals change (the retry loop waits).
        self.removals_changed = asyncio.Event()


def lease_fields(lease: Lease) -> dict[str, str]:
    return {"grant_id": lease.grant_id, "subject": lease.subject, "action": lease.action}


@contextlib.contextmanager
def best_effort(what: str) -> Iterator[None]:
    """Bookkeeping a full or failing disk must not turn into a crash: logged and skipped (the
    next write of the same kind tries again)."""
    try:
        yield
    except StateError as exc:
        log.error("cannot persist %s", what, extra={"error": str(exc)})


def cut(text: str) -> str:
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


async def sleep_or_wake(clock: Clock, until: float, wake: asyncio.Event) -> None:
    """Sleep on `clock` (a fake one in tests) until its monotonic time reaches `until`, or
    until `wake` is set."""
    if wake.is_set():
        return
    sleeper = asyncio.ensure_future(_sleep_until(clock, until))
    waiter = asyncio.ensure_future(wake.wait())
    try:
        await asyncio.wait((sleeper, waiter), return_when=asyncio.FIRST_COMPLETED)
    finally:
        sleeper.cancel()
        waiter.cancel()
        await asyncio.gather(sleeper, waiter, return_exceptions=True)


async def _sleep_until(clock: Clock, until: float) -> None:
    # Read the clock when the sleep starts, not when it was asked for.
    await clock.sleep(until - clock.monotonic())
