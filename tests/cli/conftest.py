from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from jitmesh.cli.main import main
from jitmesh.clock import FakeClock
from tests.sdk.scripted import NOW, TOKEN, Scripted, ServerThread


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def error_line(self) -> str:
        """The one stderr line a failure must produce (and nothing else)."""
        lines = self.err.splitlines()
        assert len(lines) == 1, self.err
        assert lines[0].startswith("jitctl: "), self.err
        assert "Traceback" not in self.err
        return lines[0]


Jitctl = Callable[..., Result]


@pytest.fixture
def model() -> Scripted:
    return Scripted()


@pytest.fixture
def coordinator(model: Scripted) -> Iterator[ServerThread]:
    with ServerThread(model) as running:
        yield running


@pytest.fixture
def jitctl(
    coordinator: ServerThread, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Jitctl:
    """Run jitctl in-process against the scripted coordinator (address and token from the
    environment, as an operator would set them) at a fixed time."""
    monkeypatch.setenv("JITMESH_COORDINATOR", coordinator.target)
    monkeypatch.setenv("JITMESH_TOKEN", TOKEN)

    def run(*argv: str) -> Result:
        capsys.readouterr()
        code = main(list(argv), clock=FakeClock(NOW))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run
