"""One table from domain errors to gRPC status codes, and the decorator that applies it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from jitmesh import validation
from server.domain import errors as e

log = logging.getLogger(__name__)

STATUS: dict[type[e.DomainError], grpc.StatusCode] = {
    e.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    e.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    e.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    e.NotFound: grpc.StatusCode.NOT_FOUND,
    e.Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    e.RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

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


def mapped(handler: F) -> F:
    """Turn domain errors raised by a unary handler into their gRPC status, message kept."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await handler(self, request, context)
        except e.DomainError as exc:
            await context.abort(status_of(exc), exc.message)
        except validation.ValidationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    return wrapper  # type: ignore[return-value]
