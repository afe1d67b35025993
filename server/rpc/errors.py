"""One table from domain errors to gRPC status codes and stable reasons, and the helpers that
answer with them.

Every refusal carries a google.rpc.Status in the standard `grpc-status-details-bin` trailer
(built by grpcio-status): an ErrorInfo whose `reason` is stable and documented (docs/cli.md,
"Errors and exit codes"), domain `jitmesh.dev`; a pushback adds the standard RetryInfo and our
RetryHint. Clients read the reason, never the message, to decide what to do.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from jitmesh import validation
from jitmesh.v1 import agentlink_pb2
from server.domain import errors as e
from server.domain.delivery import Pushback

log = logging.getLogger(__name__)

# The reasons are part of the API: never rename one (jitmesh/errors.py maps them back).
ERRORS: Final[dict[type[e.DomainError], tuple[grpc.StatusCode, str]]] = {
    e.Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    e.UserDisabled: (grpc.StatusCode.UNAUTHENTICATED, "USER_DISABLED"),
    e.PermissionDenied: (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    e.PolicyDenied: (grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED"),
    e.SelfApproval: (grpc.StatusCode.PERMISSION_DENIED, "SELF_APPROVAL"),
    e.InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    e.NotFound: (grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
    e.Conflict: (grpc.StatusCode.FAILED_PRECONDITION, "CONFLICT"),
    e.Locked: (grpc.StatusCode.FAILED_PRECONDITION, "LOCKED"),
    e.RateLimited: (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"),
    e.Overloaded: (grpc.StatusCode.RESOURCE_EXHAUSTED, "AGENT_BEHIND"),
    e.Unavailable: (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"),
}
# The ErrorInfo domain: whose reasons these are (google.rpc.ErrorInfo, AIP-193).
DOMAIN: Final = "jitmesh.dev"
# Where gRPC carries a google.rpc.Status with details (the grpcio-status convention).
DETAILS_KEY = "grpc-status-details-bin"


def _entry(error: e.DomainError) -> tuple[grpc.StatusCode, str]:
    for cls in type(error).__mro__:
        if cls in ERRORS:
            return ERRORS[cls]
    return grpc.StatusCode.INTERNAL, "INTERNAL"


def status_of(error: e.DomainError) -> grpc.StatusCode:
    return _entry(error)[0]


def reason_of(error: e.DomainError) -> str:
    return _entry(error)[1]


def rich_status(
    code: grpc.StatusCode, reason: str, text: str, extra: Sequence[message.Message] = ()
) -> grpc.Status:
    """A grpc.Status whose trailer holds the google.rpc.Status: ErrorInfo first, then `extra`."""
    details = []
    for detail in (error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN), *extra):
        packed = any_pb2.Any()
        packed.Pack(detail)
        details.append(packed)
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=text, details=details)
    )
    return status


def status_for(error: e.DomainError) -> grpc.Status:
    """The answer to a call that failed with `error`."""
    code, reason = _entry(error)
    extra: list[message.Message] = []
    if isinstance(error, e.Overloaded):
        hint = retry_hint(error.pushback)
        extra = [error_details_pb2.RetryInfo(retry_delay=hint.retry_after), hint]
    return rich_status(code, reason, error.message, extra)


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: e.DomainError) -> NoReturn:
    """End the call with `error`'s code, message and details (the one way handlers refuse)."""
    status = status_for(error)
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")


T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


async def not_built(
    context: grpc.aio.ServicerContext[Any, Any], method: str, issue: int
) -> NoReturn:
    """An RPC of the wire revision whose behaviour has not landed yet (docs/wire.md): gRPC's
    UNIMPLEMENTED, as an unregistered method would answer."""
    await context.abort(
        grpc.StatusCode.UNIMPLEMENTED,
        f"{method} is not implemented by this coordinator yet (issue {issue})",
    )


def retry_hint(pushback: Pushback) -> agentlink_pb2.RetryHint:
    return agentlink_pb2.RetryHint(
        retry_after=_duration(pushback.retry_after.total_seconds()),
        reason=pushback.message(),
        agent=pushback.agent,
        undelivered=min(pushback.undelivered, 2**32 - 1),
        limit=min(pushback.limit, 2**32 - 1),
    )


def pushback_metadata(pushback: Pushback) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata for a RESOURCE_EXHAUSTED answer (docs/wire.md, "Pushback"): a
    google.rpc.Status whose details are the standard RetryInfo and our RetryHint."""
    return retry_metadata(retry_hint(pushback))


def retry_metadata(
    hint: agentlink_pb2.RetryHint, reason: str = "AGENT_BEHIND"
) -> tuple[tuple[str, bytes], ...]:
    info = error_details_pb2.RetryInfo(retry_delay=hint.retry_after)
    status = rich_status(grpc.StatusCode.RESOURCE_EXHAUSTED, reason, hint.reason, [info, hint])
    return tuple(
        (key, value if isinstance(value, bytes) else value.encode())
        for key, value in status.trailing_metadata
    )


def admission_hint(seconds: float) -> agentlink_pb2.RetryHint:
    """The hint for an agent stream refused by admission control."""
    return agentlink_pb2.RetryHint(
        retry_after=_duration(seconds),
        reason=f"too many agents connecting at once; try again in {seconds:.2f}s",
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))


def mapped(handler: F) -> F:
    """Turn domain errors raised by a unary handler into their gRPC status and details,
    message kept."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await handler(self, request, context)
        except e.DomainError as exc:
            await abort(context, exc)
        except validation.ValidationError as exc:
            await abort(context, e.InvalidArgument(str(exc)))

    return wrapper  # type: ignore[return-value]
