"""The fault-injection suite runs only through `scripts/faults` (JITMESH_FAULTS=1): it starts and
kills real processes for minutes, which `scripts/test` should not repeat."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .harness import Cluster
from .results import Recorder

if not os.environ.get("JITMESH_FAULTS"):
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def recorder(tmp_path_factory: pytest.TempPathFactory) -> Recorder:
    path = os.environ.get("JITMESH_FAULTS_RESULTS")
    target = Path(path) if path else tmp_path_factory.mktemp("faults") / "results.jsonl"
    return Recorder(target)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    seed = int(os.environ.get("JITMESH_FAULTS_SEED", "1"))
    return random.Random(f"{seed}:{request.node.nodeid}")


@pytest.fixture
def long_run() -> bool:
    return bool(os.environ.get("JITMESH_FAULTS_LONG"))


@pytest.fixture
async def cluster(tmp_path: Path, recorder: Recorder) -> AsyncIterator[Cluster]:
    """A coordinator and one agent, web-1, connected; the tests that need more build their own."""
    made = Cluster(tmp_path, recorder)
    try:
        await made.start_coordinator()
        await made.apply_policy()
        await made.start_agent("web-1")
        await made.wait_connected("web-1")
        yield made
    finally:
        await made.close()
