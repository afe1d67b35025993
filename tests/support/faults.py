"""Fault injection the fault suite builds into a real coordinator or agent process, through the
interfaces their entry points take (never through the environment): a wall clock moved from
outside the process, and a step hook that dies at a named step."""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

from jitmesh.clock import SystemClock


class OffsetFileClock(SystemClock):
    """The system's wall clock plus the seconds written in `path`, re-read on every reading (a
    test moves the clock by rewriting the file; a missing or unreadable file means 0). The
    monotonic clock is left alone, as a real wall-clock step (NTP, a bad RTC) leaves it alone."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def offset(self) -> float:
        try:
            return float(self._path.read_text(encoding="ascii").strip() or "0")
        except (OSError, ValueError):
            return 0.0

    def now(self) -> datetime:
        return super().now() + timedelta(seconds=self.offset())


EXIT_CRASHED = 137
S = TypeVar("S", bound=enum.StrEnum)


def crash_at(step: S) -> Callable[[S], None]:
    """A step hook that ends the process at once the first time `step` is reached: no cleanup,
    no further writes, like SIGKILL at that exact step (exit status 137, as after SIGKILL)."""

    def hook(reached: S) -> None:
        if reached == step:
            sys.stderr.write(f"crash point {step.value}: exiting\n")
            sys.stderr.flush()
            os._exit(EXIT_CRASHED)

    return hook


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """`[launcher options] -- [program arguments]`: the two halves."""
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]
