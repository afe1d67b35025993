"""Which versions of the coordinator and the agent work together (docs/wire.md, "Mixed
versions"). One rule, used by both sides:

- a coordinator serves agents of its own minor version and of the one before it (an older agent
  gets only what it understands);
- an agent works with a coordinator of its own minor version or the next one, and refuses any
  other (an older coordinator cannot read what the agent sends; one two minors ahead may send
  what the agent cannot read).

Versions are "MAJOR.MINOR.PATCH" (a suffix after the patch number, such as "0.2.0.dev1" or
"0.2.0+local", is ignored); anything else is not a version and is refused.
"""

from __future__ import annotations

import enum
import functools
import re

_VERSION = re.compile(r"(\d{1,4})\.(\d{1,4})\.(\d{1,6})(?:[.+-][0-9A-Za-z.+-]{0,40})?")


class Compatibility(enum.StrEnum):
    SUPPORTED = "supported"  # same minor version
    COMPAT = "compat"  # one minor older: served with the older wire
    REFUSED = "refused"


# Each Hello asks about its version several times (compatibility, locks, the older wire), and
# a fleet says few distinct versions: a small cache (made-up versions only churn it).
@functools.lru_cache(maxsize=64)
def parse(version: str) -> tuple[int, int, int] | None:
    match = _VERSION.fullmatch(version)
    if match is None:
        return None
    major, minor, patch = (int(x) for x in match.groups())
    return major, minor, patch


def agent_compatibility(agent_version: str, coordinator_version: str) -> Compatibility:
    """How a coordinator of `coordinator_version` serves an agent that says `agent_version`."""
    agent, own = parse(agent_version), parse(coordinator_version)
    if agent is None or own is None or agent[0] != own[0]:
        return Compatibility.REFUSED
    if agent[1] == own[1]:
        return Compatibility.SUPPORTED
    if agent[1] == own[1] - 1:
        return Compatibility.COMPAT
    return Compatibility.REFUSED


def coordinator_supported(coordinator_version: str, agent_version: str) -> bool:
    """Whether an agent of `agent_version` works with a coordinator that says
    `coordinator_version` (empty: a coordinator older than wire 0.2)."""
    return agent_compatibility(agent_version, coordinator_version) is not Compatibility.REFUSED


def older_than(version: str, major: int, minor: int) -> bool:
    """Whether `version` is a release before MAJOR.MINOR (an unparsable one counts as older)."""
    parsed = parse(version)
    return parsed is None or parsed[:2] < (major, minor)
