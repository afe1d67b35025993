"""What the fault suite measured, one JSON object per line (the summary reads them back)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record, sort_keys=True) + "\n")

    def fault(self, kind: str, count: int = 1) -> None:
        self._write({"type": "fault", "kind": kind, "count": count})

    def grant(
        self,
        *,
        phase: str,
        overstay_ms: float,
        downtime_ms: float = 0.0,
        double_applies: int = 0,
        unauthorized: int = 0,
    ) -> None:
        """phase: connected, partitioned, crash or stopped (the last two: agent downtime in
        between, SIGKILL and restart or SIGSTOP and SIGCONT)."""
        self._write(
            {
                "type": "grant",
                "phase": phase,
                "overstay_ms": round(overstay_ms, 1),
                "downtime_ms": round(downtime_ms, 1),
                "double_applies": double_applies,
                "unauthorized": unauthorized,
            }
        )

    def issued(self, count: int = 1) -> None:
        self._write({"type": "issued", "count": count})

    def applies(self, *, double: int, unauthorized: int) -> None:
        self._write({"type": "applies", "double": double, "unauthorized": unauthorized})

    def audit(self, *, expected: int, stored: int, duplicated: int = 0) -> None:
        self._write(
            {"type": "audit", "expected": expected, "stored": stored, "duplicated": duplicated}
        )

    def storm(self, *, agents: int, seconds: float, left_behind: int) -> None:
        self._write(
            {"type": "storm", "agents": agents, "seconds": round(seconds, 2), "left": left_behind}
        )
