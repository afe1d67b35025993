"""OpenTelemetry for the coordinator (`otel = true`; the optional extra `jitmesh[otel]`): a span
per gRPC call on the operator and agent ports, exported over OTLP (configured the standard way,
by OTEL_EXPORTER_OTLP_ENDPOINT and the other OTEL_* variables), and the active span's trace id
in every log line written while it is active.

Imported only when tracing is on: without it the coordinator never loads OpenTelemetry. The
spans come from opentelemetry-instrumentation-grpc's aio server interceptor, which also joins a
trace the caller started (W3C `traceparent` in the call's metadata). AgentLink is left out: its
stream lives as long as the agent's connection (hours), a span that says nothing, and the
interceptor can only wrap response streams written by `yield` (AgentLink writes with
`context.write`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
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
        logs.add_context(trace_fields)
        log.info("tracing on", extra={"exporter": type(exporter).__name__ if exporter else "otlp"})

    def close(self) -> None:
        logs.remove_context(trace_fields)
        self.provider.shutdown()
