"""The fault-injection suite runs only through `scripts/faults` (JITMESH_FAULTS=1): it starts and
kills real processes for minutes, which `scripts/test` should not repeat."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

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
