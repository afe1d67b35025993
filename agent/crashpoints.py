"""TEST ONLY: named points where the agent can be made to die at once (the agent's copy of
server/crashpoints.py: the two packages share no code but the SDK).

With `JITMESH_TEST_CRASH_AT=<name>` in its environment, the agent calls `os._exit(137)` the first
time it reaches `crash_point("<name>")`, like SIGKILL at that exact step. The fault suite kills
the agent at each step of an apply (`agent_after_record`, `agent_after_apply`) and a revoke
(`agent_after_revoke_record`, `agent_after_remove`). Unset (always, in production), nothing.
"""

from __future__ import annotations

import os
import sys

ENV = "JITMESH_TEST_CRASH_AT"
_armed = os.environ.get(ENV, "")


def crash_point(name: str) -> None:
    if _armed and _armed == name:
        sys.stderr.write(f"crash point {name}: exiting\n")
        sys.stderr.flush()
        os._exit(137)
