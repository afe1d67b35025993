"""Time windows in a named zone, such as `weekdays 08:00-20:00 Europe/Berlin`.

A window is days, a start and an end time of day, and an IANA zone. Zones come from the `tzdata`
package, never from the host's /usr/share/zoneinfo, so two coordinators on different hosts (or a
host whose tzdata is older) judge an instant the same way. Pure: `contains(at)` is all there is.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, time
from importlib import resources
from zoneinfo import ZoneInfo

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_SETS = {
    "daily": frozenset(range(7)),
    "everyday": frozenset(range(7)),
    "weekdays": frozenset(range(5)),
    "weekends": frozenset({5, 6}),
}
_ZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+){0,2}")
_CLOCK = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])|24:00")


class WindowError(ValueError):
    """A window text that does not parse; the message says what is expected."""


@dataclass(frozen=True, slots=True)
class Window:
    text: str
    days: frozenset[int]
    start: time
    # None: midnight at the end of the day (written 24:00).
    end: time | None
    zone: ZoneInfo

    def contains(self, at: datetime) -> bool:
        """Whether the instant `at` (aware) falls inside the window, judged in its zone. A
        window whose end is before its start runs over midnight and belongs to its start day."""
        local = at.astimezone(self.zone)
        now = local.time().replace(tzinfo=None)
        day = local.weekday()
        end = self.end
        if end is None or end > self.start:
            return day in self.days and self.start <= now and (end is None or now < end)
        # Over midnight: from start on a listed day, or before end on the day after one.
        return (day in self.days and now >= self.start) or (
            (day - 1) % 7 in self.days and now < end
        )


def parse_window(text: str) -> Window:
    """`DAYS HH:MM-HH:MM ZONE`: DAYS is daily, weekdays, weekends, a day (mon) or a range or list
    of days (mon-fri, sat,sun); the zone is an IANA name (Europe/Berlin, UTC)."""
    parts = text.split()
    if len(parts) != 3:
        raise WindowError(
            "a window is 'DAYS HH:MM-HH:MM ZONE', for example 'weekdays 08:00-20:00 Europe/Berlin'"
        )
    days_text, hours, zone_name = parts
    days = _days(days_text.lower())
    start_text, sep, end_text = hours.partition("-")
    if not sep or not _CLOCK.fullmatch(start_text) or not _CLOCK.fullmatch(end_text):
        raise WindowError("window hours are HH:MM-HH:MM (24-hour clock, 24:00 for midnight)")
    if start_text == "24:00":
        raise WindowError("a window starts at 23:59 at the latest")
    start = time.fromisoformat(start_text)
    end = None if end_text == "24:00" else time.fromisoformat(end_text)
    if end == start:
        raise WindowError("a window's start and end must differ")
    return Window(text=" ".join(parts), days=days, start=start, end=end, zone=zone(zone_name))


def in_windows(windows: Iterable[Window], at: datetime) -> bool:
    """True when there are no windows (no restriction) or `at` is inside one of them."""
    listed = list(windows)
    return not listed or any(w.contains(at) for w in listed)


@functools.lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    """The named zone from the `tzdata` package (not the host's files)."""
    if name.upper() == "UTC":
        name = "UTC"
    if not _ZONE.fullmatch(name) or ".." in name:
        raise WindowError("the zone must be an IANA name such as Europe/Berlin or UTC")
    try:
        source = resources.files("tzdata.zoneinfo").joinpath(*name.split("/"))
        with source.open("rb") as fh:
            return ZoneInfo.from_file(fh, key=name)
    except (OSError, ValueError):
        raise WindowError(f"unknown time zone {name!r}") from None


def _days(text: str) -> frozenset[int]:
    if text in _DAY_SETS:
        return _DAY_SETS[text]
    out: set[int] = set()
    for item in text.split(","):
        first, sep, last = item.partition("-")
        if first not in DAY_NAMES or (sep and last not in DAY_NAMES):
            raise WindowError(
                "window days are daily, weekdays, weekends, or days such as mon-fri or sat,sun"
            )
        a = DAY_NAMES.index(first)
        b = DAY_NAMES.index(last) if sep else a
        out.update((a + k) % 7 for k in range((b - a) % 7 + 1))
    return frozenset(out)
