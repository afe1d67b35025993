"""Metrics and logs as an operator sees them: a real coordinator and a real agent (processes)
with --metrics-listen and --log-format json; a real request; the metrics scraped over HTTP and
parsed with Prometheus' own text parser; every log line parsed as JSON."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jitmesh import telemetry as t
from tests.e2e import procs
from tests.e2e.procs import free_port, read_env, wait_for, wait_healthy

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def accepts(port: int) -> bool:
    """Whether the metrics port takes connections yet (it opens after the daemon's gRPC port)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def json_lines(path: Path) -> Iterator[dict[str, object]]:
    for line in path.read_text().splitlines():
        if line.startswith(("I1", "W1", "E1")):  # gRPC C-core's own stderr lines
            continue
        yield json.loads(line)


@pytest.mark.subprocess
async def test_metrics_move_with_a_real_request_and_logs_are_json(tmp_path: Path) -> None:
    port, cmetrics, ametrics = free_port(), free_port(), free_port()
    coordinator = procs.coordinator(
        tmp_path / "coordinator", port,
        "--metrics-listen", f"127.0.0.1:{cmetrics}", "--log-format", "json", "--log-level", "debug",
    )  # fmt: skip
    coordinator.start()
    agent = None
    try:
        address = f"127.0.0.1:{port}"
        await wait_healthy(address)
        # Dev mode writes dev.env (atomically) before the port serves (376115f): the wait is
        # only a guard, it holds at once.
        env_file = tmp_path / "coordinator" / "dev.env"
        await wait_for(env_file.exists, 30, "dev.env")
        env = read_env(env_file)
        await wait_for(lambda: accepts(cmetrics), 30, "the coordinator's metrics port")
        before = scrape(cmetrics)
        assert value(before, t.AGENTS_CONNECTED) == 0
        assert value(before, t.REQUESTS + "_total", outcome="approved") == 0
        access = tmp_path / "access"
        access.mkdir()
        agent = procs.agent(
            address, "stage-1", "env=staging", env["JITMESH_JOIN_TOKEN"], tmp_path / "state",
            access, "--metrics-listen", f"127.0.0.1:{ametrics}", "--log-format", "json",
        )  # fmt: skip
        agent.start()
        await wait_for(lambda: accepts(ametrics), 30, "the agent's metrics port")
        await wait_for(
            lambda: value(scrape(cmetrics), t.AGENTS_CONNECTED) == 1, 30, "the agent connected"
        )
        code, out, err = await procs.jitctl(
            "request", "create", "--agent", "stage-1", "--action", "deploy",
            "--duration", "15m", "--wait", "-o", "json",
            env={"JITMESH_COORDINATOR": address, "JITMESH_TOKEN": env["JITMESH_TOKEN_ALICE"]},
        )  # fmt: skip
        assert code == 0, err
        grant = json.loads(out)["grant"]
        assert grant["state"] == "ACTIVE"

        after = scrape(cmetrics)
        assert value(after, t.REQUESTS + "_total", outcome="created") == 1
        assert value(after, t.REQUESTS + "_total", outcome="approved") == 1
        assert value(after, t.PUSH_LATENCY + "_count") == 1
        assert value(after, t.AUDIT_EVENTS + "_total", kind="grant.applied") == 1
        assert value(after, t.STORE_TX_LATENCY + "_count") > value(
            before, t.STORE_TX_LATENCY + "_count"
        )
        # Refreshed from the store every few seconds.
        await wait_for(
            lambda: value(scrape(cmetrics), t.GRANTS_BY_STATE, state="ACTIVE") == 1,
            30,
            "grants{state=ACTIVE} to count the grant",
        )
        await wait_for(
            lambda: value(scrape(ametrics), t.AGENT_ACTIVE_GRANTS) == 1,
            30,
            "the agent's active grants to count it",
        )
        agent_samples = scrape(ametrics)
        assert value(agent_samples, t.AGENT_CONNECTED) == 1
        assert value(agent_samples, t.AGENT_OUTBOX_DEPTH) >= 0
        # No label names an agent, a subject or a grant.
        for _name, labels in after.keys() | agent_samples.keys():
            assert not {k for k, _ in labels} & {"agent", "subject", "grant_id", "request_id"}
    finally:
        if agent is not None:
            agent.stop()
        coordinator.stop()

    clines = list(json_lines(coordinator.log))
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in clines)
    connected = [line for line in clines if line["msg"] == "agent connected"]
    assert connected
    assert connected[0]["agent"] == "stage-1"
    assert str(connected[0]["peer"]).startswith("ipv4:127.0.0.1:")
    rpcs = [line for line in clines if line["msg"] == "rpc"]
    assert any(line["method"] == "/jitmesh.v1.Access/CreateRequest" for line in rpcs)
    assert all(line["code"] and "duration_ms" in line for line in rpcs)
    alines = list(json_lines(agent.log))
    assert alines
    assert all(line["agent"] == "stage-1" for line in alines)
    assert any(line["msg"] == "agent started" for line in alines)


def test_the_dashboard_names_only_metrics_that_exist() -> None:
    dashboard = Path(__file__).parents[2] / "docs" / "grafana-dashboard.json"
    exprs = [
        target["expr"]
        for panel in json.loads(dashboard.read_text())["panels"]
        for target in panel["targets"]
    ]
    known = {value for name, value in vars(t).items() if name.isupper() and isinstance(value, str)}
    known |= {t.PREFIX + "_revokes_unacked", t.PREFIX + "_agent_removals_pending"}
    used = {
        re.sub(r"_(bucket|total)$", "", name)
        for expr in exprs
        for name in re.findall(r"jitmesh_[a-z_]+", expr)
    }
    assert used
    assert used <= known, used - known
