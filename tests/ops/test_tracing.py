"""OpenTelemetry on the coordinator (`otel = true`, the `jitmesh[otel]` extra): a real
coordinator in this event loop, its spans caught by the SDK's in-memory exporter, its log lines
written as JSON. A CreateRequest makes a server span; the lines written during the call carry
that span's trace id; lines outside any span carry none."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from jitmesh import Client, logs
from server.app import build
from server.config import CoordinatorConfig
from server.domain.policy import DEV_POLICY

CREATE = "/jitmesh.v1.Access/CreateRequest"


@contextlib.contextmanager
def json_logs() -> Iterator[io.StringIO]:
    """Every logger's lines as JSON into a buffer, at debug (the access log line's level); the
    root logger as it was afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buffer = io.StringIO()
    logs.setup("debug", "json", stream=buffer)
    try:
        yield buffer
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


async def test_a_create_request_makes_a_span_and_its_log_lines_carry_the_trace_id(
    tmp_path: Path,
) -> None:
    exporter = InMemorySpanExporter()
    config = CoordinatorConfig(
        data_dir=tmp_path / "coordinator", port=0, default_policy=DEV_POLICY, otel=True
    )
    with json_logs() as lines:
        coordinator = await build(config, span_exporter=exporter)
        runner = asyncio.create_task(coordinator.run())
        try:
            await coordinator.identity.ensure_user("alice", ["developers"], "jmt_test-alice")
            async with coordinator.store.transaction() as tx:
                now = coordinator.clock.now()
                assert await tx.enroll_agent("web-1", {"env": "staging"}, "hash-web-1", now)
            async with await Client.connect(
                f"127.0.0.1:{coordinator.port}", token="jmt_test-alice"
            ) as alice:
                request, _ = await alice.create_request(
                    agent="web-1", action="deploy", duration=timedelta(minutes=5)
                )
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
    spans = [s for s in exporter.get_finished_spans() if s.name == CREATE]
    assert len(spans) == 1
    [span] = spans
    assert span.kind is SpanKind.SERVER
    assert span.resource.attributes["service.name"] == "jitmesh-coordinator"
    assert span.context is not None
    trace_id = format(span.context.trace_id, "032x")

    # The request's write transaction, a span of its own inside the call's trace.
    writes = [
        s for s in exporter.get_finished_spans()
        if s.name == "store.transaction" and s.context is not None
        and s.context.trace_id == span.context.trace_id
    ]  # fmt: skip
    assert writes
    assert all(w.attributes == {"db.system": "sqlite"} for w in writes)
    assert all(w.start_time is not None and w.end_time is not None for w in writes)
    assert all(span.start_time <= w.start_time <= w.end_time <= span.end_time for w in writes)  # type: ignore[operator]

    parsed = [json.loads(line) for line in lines.getvalue().splitlines()]
    access = [line for line in parsed if line["msg"] == "rpc" and line.get("method") == CREATE]
    assert len(access) == 1
    assert access[0]["trace_id"] == trace_id
    assert request.grant_id
    # Outside any call: no trace id.
    listening = [line for line in parsed if line["msg"] == "coordinator listening"]
    assert listening
    assert "trace_id" not in listening[0]
    # The agent's stream is not traced (it lives as long as the connection).
    assert not [s for s in exporter.get_finished_spans() if "AgentLink" in s.name]
