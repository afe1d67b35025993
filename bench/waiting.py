"""Waiting for a condition that another process or many tasks change (no event to wait on)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(done: Callable[[], bool], within: float, what: str, step: float = 0.005) -> float:
    """Poll `done` every `step` seconds; returns the seconds waited, or raises TimeoutError."""
    started = time.monotonic()
    # Polling on purpose: the state lives in another process or in thousands of objects.
    while not done():
        if time.monotonic() - started > within:
            raise TimeoutError(f"not {what} after {within:.0f} s")
        await asyncio.sleep(step)
    return time.monotonic() - started
