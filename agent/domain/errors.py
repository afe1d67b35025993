"""Errors of the agent.

    AgentError
    ├── ConfigError            bad flags or configuration: the agent does not start
    ├── StateError             the state directory or the lease table cannot be used
    │   ├── DiskFull           the disk holding the state directory is full
    │   └── StateUnreadable    the lease table is damaged or not a database (moved aside)
    ├── EnrollmentError        no credential and no join token, or enrollment went wrong
    │   ├── EnrollmentRefused  join token, name or labels refused: retrying cannot help
    │   └── NotReached         nothing answered at the coordinator's address (UNAVAILABLE)
    ├── LinkError              the coordinator broke the stream protocol
    ├── MalformedCommand       a command that does not parse or validate (acked REJECTED)
    └── EnforcerError          an enforcer could not apply, remove or observe
        ├── HookFailed         an exec hook exited non-zero (`exit_code`)
        ├── HookTimeout        an exec hook ran past its timeout; its process group was killed
        └── ApplyFailed        one enforcer of several failed to apply; the others were rolled back

Messages name what went wrong, never the offending value: values can be secrets or hostile input.
"""

from __future__ import annotations


class AgentError(Exception):
    pass


class ConfigError(AgentError):
    pass


class StateError(AgentError):
    pass


class DiskFull(StateError):
    """The disk holding the state directory is full: nothing is wrong with the lease table."""


class StateUnreadable(StateError):
    """The lease table is not a database SQLite can read (damaged, truncated, another file):
    the agent moves it aside and starts with an empty one."""


class EnrollmentError(AgentError):
    pass


class EnrollmentRefused(EnrollmentError):
    """Retrying cannot help (a used or expired join token, a name already enrolled, labels the
    token does not give): the agent stops and says why, instead of asking again for ever."""


class NotReached(EnrollmentError):
    """The enrollment got no answer from that address (nothing listening, or the connection
    failed before the coordinator said anything): another replica may be tried at once."""


class LinkError(AgentError):
    pass


class MalformedCommand(AgentError):
    pass


class EnforcerError(AgentError):
    pass


class HookFailed(EnforcerError):
    def __init__(self, message: str, *, exit_code: int, tail: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        # A short, redacted end of the hook's stderr, for the local log only (never sent upstream).
        self.tail = tail


class HookTimeout(EnforcerError):
    pass


class ApplyFailed(EnforcerError):
    def __init__(self, cause: EnforcerError, *, rolled_back: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        # False when undoing the enforcers that had applied failed too: access may be partly in
        # place, so the caller must keep trying to remove the pair.
        self.rolled_back = rolled_back
