"""One table from domain errors to gRPC status codes, and the decorator that applies it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from jitmesh import validation
from jitmesh.v1 import agentlink_pb2
from server.domain import errors as e
from server.domain.delivery import Pushback

log = logging.getLogger(__name__)

STATUS: dict[type[e.DomainError], grpc.StatusCode] = {
    e.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    e.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    e.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    e.NotFound: grpc.StatusCode.NOT_FOUND,
    e.Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    e.RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Where gRPC carries a google.rpc.Status with details (the grpcio-status convention).
DETAILS_KEY = "grpc-status-details-bin"


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


def status_of(error: e.DomainError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


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


def retry_metadata(hint: agentlink_pb2.RetryHint) -> tuple[tuple[str, bytes], ...]:
    info = error_details_pb2.RetryInfo(retry_delay=hint.retry_after)
    details = []
    for message in (info, hint):
        packed = any_pb2.Any()
        packed.Pack(message)
        details.append(packed)
    status = status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED, message=hint.reason, details=details
    )
    return ((DETAILS_KEY, status.SerializeToString()),)


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
    """Turn domain errors raised by a unary handler into their gRPC status, message kept."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await handler(self, request, context)
        except e.Overloaded as exc:
            await context.abort(
                status_of(exc), exc.message, trailing_metadata=pushback_metadata(exc.pushback)
            )
        except e.DomainError as exc:
            await context.abort(status_of(exc), exc.message)
        except validation.ValidationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    return wrapper  # type: ignore[return-value]
