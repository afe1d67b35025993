"""TEST ONLY: named points where a coordinator or agent process can be made to die at once.

With `JITMESH_TEST_CRASH_AT=<name>` in its environment, a process calls `os._exit(137)` the first
time it reaches `crash_point("<name>")`: no cleanup, no further writes, like SIGKILL at that exact
step. The fault suite (docs/faults.md) kills the coordinator at each step of an approval
(`before_commit`, `after_commit`, `after_push`, `after_ack`) and the agent at each step of an
apply (`agent_after_record`, `agent_after_apply`) and a revoke (`agent_after_revoke_record`,
`agent_after_remove`). Unset (always, in production), a crash point does nothing. It lives in the
shared package because coordinator and agent share no code but this one.
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
