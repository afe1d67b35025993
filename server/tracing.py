"""OpenTelemetry for the coordinator (`otel = true`; the optional extra `jitmesh[otel]`): a span
per gRPC call on the operator and agent ports and one per committed store write transaction,
exported over OTLP (configured the standard way, by OTEL_EXPORTER_OTLP_ENDPOINT and the other
OTEL_* variables), and the active span's trace id in every log line written while it is active.

Imported only when tracing is on: without it the coordinator never loads OpenTelemetry. The
spans come from opentelemetry-instrumentation-grpc's aio server interceptor, which also joins a
trace the caller started (W3C `traceparent` in the call's metadata). AgentLink is left out: its
stream lives as long as the agent's connection (hours), a span that says nothing, and the
interceptor can only wrap response streams written by `yield` (AgentLink writes with
`context.write`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import SpanKind

from jitmesh import __version__, logs
from jitmesh import telemetry as t

log = logging.getLogger(__name__)

SERVICE_NAME = "jitmesh-coordinator"


def trace_fields() -> Mapping[str, object]:
    """The active span's trace id, for the log line being written (none without a span)."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {t.TRACE_ID: format(context.trace_id, "032x")}


class Tracing:
    """The tracer provider and the interceptor made from it; `close` flushes what is queued."""

    def __init__(self, exporter: SpanExporter | None = None, replica: str = "") -> None:
        attributes = {"service.name": SERVICE_NAME, "service.version": __version__}
        if replica:
            attributes["service.instance.id"] = replica
        self.provider = TracerProvider(resource=Resource.create(attributes))
        if exporter is None:
            # Imported here: the OTLP exporter pulls in its own gRPC client code.
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            # Given by tests (an in-memory exporter): each span as it ends.
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        only = filters.all_of(
            filters.service_prefix("jitmesh.v1."),
            filters.negate(filters.service_name("jitmesh.v1.AgentLink")),
        )
        # The factory has no annotations (the package's other functions do).
        self.interceptor: Any = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.provider, filter_=only
        )
        self._tracer = self.provider.get_tracer(__name__, __version__)
        logs.add_context(trace_fields)
        log.info("tracing on", extra={"exporter": type(exporter).__name__ if exporter else "otlp"})

    def transaction(self, store: str) -> Callable[[float], None]:
        """An observer of the store's committed write transactions (`observe_transaction`,
        told each one's BEGIN-to-COMMIT seconds just after its COMMIT): each becomes a span,
        drawn after the fact over exactly that time, a child of the call that ran it."""

        def observe(seconds: float) -> None:
            end = time.time_ns()
            span = self._tracer.start_span(
                "store.transaction",
                kind=SpanKind.INTERNAL,
                start_time=end - int(seconds * 1e9),
                attributes={"db.system": store},
            )
            span.end(end_time=end)

        return observe

    def close(self) -> None:
        logs.remove_context(trace_fields)
        self.provider.shutdown()
