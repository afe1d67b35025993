"""The named steps of applying and revoking a grant, reported to a hook given at build time.

Production passes no hook. The fault suite's launcher (`tests/support/faulty_agent.py`) builds
the agent with one that exits the process at a chosen step, like SIGKILL there, so it can check
that every step is safe to die at. The hook is an argument of `agent.app.run`, never read from
the environment: nothing outside the process can turn it on.
"""

from __future__ import annotations

import enum
from collections.abc import Callable


class Step(enum.StrEnum):
    # A grant's lease is recorded, the host not changed yet.
    AFTER_RECORD = "agent_after_record"
    # The grant is in force on the host, the ack not sent yet.
    AFTER_APPLY = "agent_after_apply"
    # A revoke is recorded, the access not removed yet.
    AFTER_REVOKE_RECORD = "agent_after_revoke_record"
    # The access is removed, the ack not sent yet.
    AFTER_REMOVE = "agent_after_remove"


StepHook = Callable[[Step], None]


def no_hook(step: Step) -> None:
    """The production hook: nothing happens at any step."""
