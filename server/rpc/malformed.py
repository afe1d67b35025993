"""Bytes that are not the method's protobuf message get INVALID_ARGUMENT (issue 10, item 5).

gRPC's own handling answers UNKNOWN with Python class names ("Unexpected <class
'google.protobuf.message.DecodeError'>") and logs a traceback per call, so any caller, even
without credentials, can write seven lines to the coordinator's log per call. Here the request
is parsed by a deserializer that never raises; a message that does not parse is refused before
any handler runs (methods with one request message: every operator RPC), and logged as one
line at most every LOG_EVERY seconds (with the number of refusals in between).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import grpc

from server.domain.errors import InvalidArgument

from .errors import abort

log = logging.getLogger(__name__)

LOG_EVERY: Final = 10.0


class _Malformed:
    """Stands for a request whose bytes did not parse."""


_MALFORMED: Final = _Malformed()


class _OneLine:
    """One log line per LOG_EVERY seconds, counting the refusals it stood for."""

    def __init__(self, every: float = LOG_EVERY, clock: Callable[[], float] = time.monotonic):
        self._every = every
        self._clock = clock
        self._last = -every
        self._skipped = 0

    def refused(self, method: str, peer: str) -> None:
        now = self._clock()
        if now - self._last < self._every:
            self._skipped += 1
            return
        more = f" (and {self._skipped} more since the last line)" if self._skipped else ""
        log.warning("malformed request refused method=%s peer=%s%s", method, peer, more)
        self._last, self._skipped = now, 0


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not subscriptable at run time
    _Interceptor = grpc.aio.ServerInterceptor


class MalformedRequests(_Interceptor):
    def __init__(self) -> None:
        self._log = _OneLine()
        # The wrapped handler per method, made once: the handlers gRPC looks up are the same
        # objects call after call (a new one, e.g. the access log's at debug level, is wrapped
        # anew). Building closures and a handler tuple per call was per-request work.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        method = details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Any) -> Any:
        parse = handler.request_deserializer

        def safe(raw: bytes) -> Any:
            try:
                return parse(raw)
            except Exception:  # DecodeError, or a wrong type on the wire: never raised to gRPC
                return _MALFORMED

        async def refuse(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            self._log.refused(method, context.peer())
            name = method.rsplit("/", 1)[-1]
            await abort(
                context,
                InvalidArgument(
                    f"the request is not a valid {name} message (protobuf that does not parse)"
                ),
            )

        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                if request is _MALFORMED:
                    await refuse(context)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, safe, serialize)
        if handler.unary_stream is not None:
            inner_us: Any = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                if request is _MALFORMED:
                    await refuse(context)
                if inspect.isasyncgenfunction(inner_us):
                    async for item in inner_us(request, context):
                        yield item
                else:
                    await inner_us(request, context)

            return grpc.unary_stream_rpc_method_handler(unary_stream, safe, serialize)
        # Request streams (AgentLink.Connect reads with context.read() and checks each
        # message's type itself) keep gRPC's own handling.
        return handler
