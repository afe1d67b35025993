"""The named steps of an approval and an ack, reported to a hook given at build time.

Production passes no hook. The fault suite's launcher (`tests/support/crashing_coordinator.py`)
builds the coordinator with one that exits the process at a chosen step, like SIGKILL there, so
it can check that every step is safe to die at. The hook is an argument of `server.app.build`,
never read from the environment: nothing outside the process can turn it on.
"""

from __future__ import annotations

import enum
from collections.abc import Callable


class Step(enum.StrEnum):
    # The approval's grants, commands and audit are written, not yet committed.
    BEFORE_COMMIT = "before_commit"
    # Committed; the commands are not pushed to the agents yet.
    AFTER_COMMIT = "after_commit"
    # The agent applied a command and acked it; the ack is not recorded yet.
    AFTER_PUSH = "after_push"
    # The ack is recorded; nobody has been told yet.
    AFTER_ACK = "after_ack"


StepHook = Callable[[Step], None]


def no_hook(step: Step) -> None:
    """The production hook: nothing happens at any step."""
