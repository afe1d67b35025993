"""Human durations ("15m", "1h30m", "90s") to `timedelta` and back."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d{1,9})(ms|s|m|h|d)")
_WHOLE = re.compile(r"(?:\d{1,9}(?:ms|s|m|h|d))+")
# Nothing in jitmesh lasts longer than this; it also keeps arithmetic far from overflow.
MAX_DURATION = timedelta(days=366)


class DurationError(ValueError):
    pass


def parse_duration(text: str) -> timedelta:
    """Parse "15m", "1h30m", "2d", "500ms". Refuses zero, negative, empty and absurd values."""
    value = text.strip()
    if not value or len(value) > 32 or not _WHOLE.fullmatch(value):
        raise DurationError("duration must look like 90s, 15m, 1h30m or 2d")
    seconds = sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(value))
    result = timedelta(seconds=seconds)
    if result <= timedelta(0):
        raise DurationError("duration must be positive")
    if result > MAX_DURATION:
        raise DurationError("duration must be at most 366d")
    return result


def format_duration(value: timedelta) -> str:
    """Shortest exact form: 1h30m, 15m, 45s, 250ms."""
    ms = round(value.total_seconds() * 1000)
    if ms <= 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        n, ms = divmod(ms, size)
        if n:
            parts.append(f"{n}{unit}")
    if ms:
        parts.append(f"{ms}ms")
    return "".join(parts)
