"""TEST ONLY: named points where the coordinator can be made to die at once.

With `JITMESH_TEST_CRASH_AT=<name>` in its environment, the coordinator calls `os._exit(137)` the
first time it reaches `crash_point("<name>")`: no cleanup, no further writes, like SIGKILL at that
exact step. The fault suite uses it to kill the coordinator at each step of an approval
(`before_commit`, `after_commit`, `after_push`, `after_ack`). Unset (always, in production), a
crash point does nothing.
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
