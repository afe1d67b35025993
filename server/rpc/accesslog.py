"""An access log line per RPC at debug level: method, peer, status code and duration, with the
keys of `jitmesh.telemetry`. Off (and free) unless the log level is debug when the call starts.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from jitmesh import telemetry as t

log = logging.getLogger("jitmesh.access")


def _line(method: str, context: grpc.aio.ServicerContext[Any, Any], began: float) -> None:
    code = context.code()
    name = code.name if isinstance(code, grpc.StatusCode) else "OK"
    log.debug(
        "rpc",
        extra={
            t.METHOD: method,
            t.PEER: context.peer(),
            t.CODE: name,
            t.DURATION_MS: round((time.monotonic() - began) * 1000, 3),
        },
    )


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic only in grpc-stubs
    _Interceptor = grpc.aio.ServerInterceptor


class AccessLog(_Interceptor):
    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or not log.isEnabledFor(logging.DEBUG):
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None or handler.stream_unary is not None:
            streaming_in = handler.stream_unary is not None
            # grpc-stubs type handlers for the sync server; these are grpc.aio's coroutines.
            inner_unary: Any = handler.stream_unary if streaming_in else handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                began = time.monotonic()
                try:
                    return await inner_unary(request, context)
                finally:
                    _line(method, context, began)

            make = (
                grpc.stream_unary_rpc_method_handler
                if streaming_in
                else grpc.unary_unary_rpc_method_handler
            )
            return make(unary, handler.request_deserializer, handler.response_serializer)
        streaming_in = handler.stream_stream is not None
        inner_stream: Any = handler.stream_stream if streaming_in else handler.unary_stream
        stream: Any
        # Keep the handler's own shape: grpc.aio treats an async generator (responses yielded)
        # and a coroutine (responses written with context.write) differently.
        if inspect.isasyncgenfunction(inner_stream):

            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                began = time.monotonic()
                try:
                    async for item in inner_stream(request, context):
                        yield item
                finally:
                    _line(method, context, began)

        else:

            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                began = time.monotonic()
                try:
                    return await inner_stream(request, context)
                finally:
                    _line(method, context, began)

        make_stream = (
            grpc.stream_stream_rpc_method_handler
            if streaming_in
            else grpc.unary_stream_rpc_method_handler
        )
        return make_stream(stream, handler.request_deserializer, handler.response_serializer)
