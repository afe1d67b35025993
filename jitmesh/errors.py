"""Errors raised by the jitmesh SDK.

    JitmeshError
    ├── UnavailableError          the coordinator cannot be reached (UNAVAILABLE)
    ├── DeadlineExceededError     the call ran out of time (DEADLINE_EXCEEDED)
    ├── AuthenticationError       no or bad credential (UNAUTHENTICATED)
    ├── PermissionDeniedError     the credential lacks the right (PERMISSION_DENIED)
    │   └── PolicyDeniedError     no policy rule gives it (reason POLICY_DENIED)
    ├── InvalidArgumentError      bad input; nothing was changed (INVALID_ARGUMENT, OUT_OF_RANGE)
    ├── NotFoundError             no such request, grant, agent (NOT_FOUND)
    ├── ConflictError             the object is not in a state that allows this
    │   │                         (FAILED_PRECONDITION, ABORTED, ALREADY_EXISTS)
    │   └── LockedError           a lock is in force on the target (reason LOCKED)
    ├── RateLimitedError          too many calls, or the agent is behind: try again later
    │                             (RESOURCE_EXHAUSTED; `retry_after` when the coordinator
    │                             said when)
    └── InternalError             anything else the coordinator reports

Every error carries the gRPC status code name in `code`, a one-line message for people, and
`reason`: the coordinator's stable machine-readable reason (google.rpc.ErrorInfo), one of
REASONS, or "" when the answer carried none (an older coordinator, or a failure on the way).
Programs decide on the class or the reason, never on the message.
"""

from __future__ import annotations

# The reasons a coordinator gives (server/rpc/errors.py sets them; docs/cli.md lists them), and
# what each means. Stable: a reason is never renamed.
REASONS: dict[str, str] = {
    "UNAUTHENTICATED": "no credential, or one the coordinator does not accept",
    "USER_DISABLED": "the credential is good but its user is disabled",
    "PERMISSION_DENIED": "the caller may not do this (the message says who may)",
    "POLICY_DENIED": "no policy rule gives this subject this action on this agent",
    "SELF_APPROVAL": "nobody reviews their own request",
    "INVALID_ARGUMENT": "bad input; nothing was changed",
    "NOT_FOUND": "no such object, or not one the caller may see",
    "CONFLICT": "the object's state does not allow this now",
    "LOCKED": "a lock is in force on the subject, agent or action",
    "RATE_LIMITED": "too many calls from this caller; slow down",
    "AGENT_BEHIND": "the agent's undelivered commands reached their bound; retry after the hint",
    "BUSY": "too many agents connecting at once; retry after the hint",
    "STORE_UNAVAILABLE": "the coordinator's database did not answer; the message says whether "
    "anything may have changed",
}


class JitmeshError(Exception):
    code: str = "UNKNOWN"
    reason: str = ""

    def __init__(self, message: str, *, code: str | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if reason:
            self.reason = reason

    def __str__(self) -> str:
        return self.message


class UnavailableError(JitmeshError):
    code = "UNAVAILABLE"


class DeadlineExceededError(JitmeshError):
    code = "DEADLINE_EXCEEDED"


class AuthenticationError(JitmeshError):
    code = "UNAUTHENTICATED"


class PermissionDeniedError(JitmeshError):
    code = "PERMISSION_DENIED"


class PolicyDeniedError(PermissionDeniedError):
    """The policy has no rule that gives this subject this action on this agent."""

    reason = "POLICY_DENIED"


class InvalidArgumentError(JitmeshError):
    code = "INVALID_ARGUMENT"


class NotFoundError(JitmeshError):
    code = "NOT_FOUND"


class ConflictError(JitmeshError):
    code = "FAILED_PRECONDITION"


class LockedError(ConflictError):
    """A lock is in force on the subject, agent or action (an admin lifts it)."""

    reason = "LOCKED"


class RateLimitedError(JitmeshError):
    """Not now. `retry_after` (seconds) is the coordinator's hint when it gave one (an agent
    whose undelivered commands reached their bound names `agent`); the SDK has already waited
    and retried for up to the client's `pushback_wait` before raising this."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        reason: str = "",
        retry_after: float | None = None,
        agent: str = "",
    ) -> None:
        super().__init__(message, code=code, reason=reason)
        self.retry_after = retry_after
        self.agent = agent


class InternalError(JitmeshError):
    code = "INTERNAL"


__all__ = [
    "AuthenticationError",
    "ConflictError",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "JitmeshError",
    "LockedError",
    "NotFoundError",
    "PermissionDeniedError",
    "PolicyDeniedError",
    "RateLimitedError",
    "UnavailableError",
]
