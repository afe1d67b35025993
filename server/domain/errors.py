"""Coordinator domain errors. The rpc layer maps each to a gRPC status by one table.

    DomainError
    ├── Unauthenticated      no or unknown credential
    │   └── UserDisabled     the credential is good but its user is disabled
    ├── PermissionDenied     the principal may not do this
    │   ├── PolicyDenied     no policy rule gives this subject this action on this agent
    │   └── SelfApproval     a review of one's own request
    ├── InvalidArgument      bad input; nothing was changed
    ├── NotFound             no such object
    ├── Conflict             the object's state does not allow this (approving a denied request)
    │   └── Locked           a lock is in force on the target
    ├── RateLimited          too many calls
    └── Overloaded           an agent's undelivered commands reached their bound (retry later)

The class is the machine-readable part: the rpc layer turns each into a gRPC code and a stable
ErrorInfo reason by one table (server/rpc/errors.py). Messages are one line for people, name
fields and rules, say what to do where there is something to do, and never echo secrets or
unchecked input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from jitmesh.validation import ValidationError

from .delivery import Pushback


class DomainError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unauthenticated(DomainError):
    pass


class UserDisabled(Unauthenticated):
    pass


class PermissionDenied(DomainError):
    pass


class PolicyDenied(PermissionDenied):
    pass


class SelfApproval(PermissionDenied):
    pass


class InvalidArgument(DomainError):
    pass


class NotFound(DomainError):
    pass


class Conflict(DomainError):
    pass


class Locked(Conflict):
    pass


class RateLimited(DomainError):
    def __init__(self, message: str, *, first: bool = True) -> None:
        super().__init__(message)
        # The first refusal since the caller's last allowed call: worth one audit entry, where
        # auditing every refusal would let a flood write the audit log.
        self.first = first


class Unavailable(DomainError):
    """The store did not answer: unreachable, or too busy to give a connection in time.
    Nothing was written (a transaction that could not start or finish rolls back); the caller
    may try again."""


class Overloaded(DomainError):
    """Not now: the agent would not get the command in time (`delivery.pushback`). Carries
    the retry hint; nothing was written."""

    def __init__(self, pushback: Pushback) -> None:
        super().__init__(pushback.message())
        self.pushback = pushback


@contextmanager
def invalid_input() -> Iterator[None]:
    """Input checks (`jitmesh.validation`) inside the block fail as InvalidArgument, with the
    check's own message (which names the field, never the value)."""
    try:
        yield
    except ValidationError as exc:
        raise InvalidArgument(str(exc)) from None
