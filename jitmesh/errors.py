"""Errors raised by the jitmesh SDK.

    JitmeshError
    ├── UnavailableError          the coordinator cannot be reached (UNAVAILABLE)
    ├── DeadlineExceededError     the call ran out of time (DEADLINE_EXCEEDED)
    ├── AuthenticationError       no or bad credential (UNAUTHENTICATED)
    ├── PermissionDeniedError     the credential lacks the right, or policy denies
    │                             (PERMISSION_DENIED)
    ├── InvalidArgumentError      bad input; nothing was changed (INVALID_ARGUMENT, OUT_OF_RANGE)
    ├── NotFoundError             no such request, grant, agent (NOT_FOUND)
    ├── ConflictError             the object is not in a state that allows this
    │                             (FAILED_PRECONDITION, ABORTED, ALREADY_EXISTS)
    ├── RateLimitedError          too many calls, or the agent is behind: try again later
    │                             (RESOURCE_EXHAUSTED; `retry_after` when the coordinator
    │                             said when)
    └── InternalError             anything else the coordinator reports

Every error carries the gRPC status code name in `code` and a one-line message.
"""

from __future__ import annotations


class JitmeshError(Exception):
    code: str = "UNKNOWN"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

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


class InvalidArgumentError(JitmeshError):
    code = "INVALID_ARGUMENT"


class NotFoundError(JitmeshError):
    code = "NOT_FOUND"


class ConflictError(JitmeshError):
    code = "FAILED_PRECONDITION"


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
        retry_after: float | None = None,
        agent: str = "",
    ) -> None:
        super().__init__(message, code=code)
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
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitedError",
    "UnavailableError",
]
