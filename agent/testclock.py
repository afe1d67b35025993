"""TEST ONLY: a wall clock the fault suite can move from outside the agent process.

When the environment variable `JITMESH_TEST_CLOCK_OFFSET_FILE` names a file, the agent's wall clock
is the system's plus the number of seconds written in that file (re-read on every reading, so a
test moves the agent's clock by rewriting it; a missing or unreadable file means offset 0). The
monotonic clock is left alone, as a real wall-clock step (NTP, a bad RTC) leaves it alone. Never
set it in production: it exists so `tests/faults/` can jump and rewind a real agent's clock.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from jitmesh.clock import Clock, SystemClock

ENV = "JITMESH_TEST_CLOCK_OFFSET_FILE"


class OffsetFileClock(SystemClock):
    def __init__(self, path: Path) -> None:
        self._path = path

    def offset(self) -> float:
        try:
            return float(self._path.read_text(encoding="ascii").strip() or "0")
        except (OSError, ValueError):
            return 0.0

    def now(self) -> datetime:
        return super().now() + timedelta(seconds=self.offset())


def from_env() -> Clock | None:
    path = os.environ.get(ENV)
    return OffsetFileClock(Path(path)) if path else None
