"""Reads the fault suite's results (JSON lines) and prints the summary table and JSON.

    python -m tests.faults.summary RESULTS.jsonl [--seed N] [--json OUT]

Exit status 1 when a promise is broken: a grant outliving its expiry by more than 250 ms outside
agent downtime (after a crash or while the agent was stopped: more than the downtime plus 250 ms),
a double or unauthorized apply, an audit event lost or stored twice, or agents left behind after
the reconnect storm.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

MARGIN_MS = 250.0


def pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[index]


def summarize(records: list[dict[str, Any]], seed: str) -> dict[str, Any]:
    faults: Counter[str] = Counter()
    # crash: the agent was killed and restarted; stopped: frozen (SIGSTOP) and resumed. In both
    # the agent was not running, and the allowance is its downtime plus the margin.
    grants: dict[str, list[dict[str, Any]]] = {
        "connected": [],
        "partitioned": [],
        "crash": [],
        "stopped": [],
    }
    issued = 0
    double = unauthorized = 0
    expected = stored = duplicated = 0
    storms: list[dict[str, Any]] = []
    for r in records:
        kind = r["type"]
        if kind == "fault":
            faults[r["kind"]] += r["count"]
        elif kind == "issued":
            issued += r["count"]
        elif kind == "grant":
            grants.setdefault(r["phase"], []).append(r)
            double += r["double_applies"]
            unauthorized += r["unauthorized"]
        elif kind == "applies":
            double += r["double"]
            unauthorized += r["unauthorized"]
        elif kind == "audit":
            expected += r["expected"]
            stored += r["stored"]
            duplicated += r["duplicated"]
        elif kind == "storm":
            storms.append(r)
    overstay: dict[str, Any] = {}
    above = 0
    for phase, rows in grants.items():
        values = [row["overstay_ms"] for row in rows]
        # After an agent crash or stop the allowance is the downtime plus the margin.
        above += sum(1 for row in rows if row["overstay_ms"] > row["downtime_ms"] + MARGIN_MS)
        overstay[phase] = {
            "grants": len(values),
            "max_ms": max(values, default=0.0),
            "downtime_max_ms": max((row["downtime_ms"] for row in rows), default=0.0),
            "p99_ms": pct(values, 99),
            "p50_ms": pct(values, 50),
        }
    storm = max(storms, key=lambda s: s["agents"], default=None)
    return {
        "seed": seed,
        "faults": dict(sorted(faults.items())),
        "faults_total": sum(faults.values()),
        "grants_issued": issued,
        "overstay": overstay,
        "overstay_above_250ms": above,
        "double_applies": double,
        "unauthorized_applies": unauthorized,
        "audit": {"expected": expected, "stored": stored, "duplicated": duplicated},
        "storm": storm,
    }


def broken(summary: dict[str, Any]) -> list[str]:
    problems = []
    if summary["overstay_above_250ms"]:
        problems.append(f"{summary['overstay_above_250ms']} grants outlived expiry by > 250 ms")
    if summary["double_applies"]:
        problems.append(f"{summary['double_applies']} double applies")
    if summary["unauthorized_applies"]:
        problems.append(f"{summary['unauthorized_applies']} unauthorized applies")
    audit = summary["audit"]
    if audit["stored"] != audit["expected"] or audit["duplicated"]:
        problems.append(f"audit: expected {audit['expected']}, stored {audit['stored']}")
    storm = summary["storm"]
    if storm is None:
        problems.append("no reconnect storm measured")
    elif storm["left"]:
        problems.append(f"{storm['left']} agents left behind after the storm")
    return problems


def table(summary: dict[str, Any]) -> str:
    lines = [f"jitmesh fault suite, seed {summary['seed']}", ""]
    lines.append("faults injected by kind")
    for kind, count in summary["faults"].items():
        lines.append(f"  {kind:<34} {count:>6}")
    lines.append(f"  {'total':<34} {summary['faults_total']:>6}")
    lines.append("")
    lines.append(f"grants issued                  {summary['grants_issued']:>6}")
    lines.append(
        "overstay (ms past expiry; after an agent crash or stop the allowance is downtime + 250)"
    )
    lines.append(f"  {'phase':<13} {'grants':>6} {'max':>9} {'p99':>9} {'p50':>9}")
    for phase, o in summary["overstay"].items():
        lines.append(
            f"  {phase:<13} {o['grants']:>6} {o['max_ms']:>9.1f} {o['p99_ms']:>9.1f} "
            f"{o['p50_ms']:>9.1f}"
            + (
                f"  (agent downtime up to {o['downtime_max_ms']:.0f} ms)"
                if o["downtime_max_ms"]
                else ""
            )
        )
    lines.append(f"  above 250 ms                 {summary['overstay_above_250ms']:>6}")
    lines.append(f"double applies                 {summary['double_applies']:>6}")
    lines.append(f"unauthorized applies           {summary['unauthorized_applies']:>6}")
    audit = summary["audit"]
    lines.append(
        f"audit events expected/stored   {audit['expected']:>6} / {audit['stored']}"
        f" (duplicated {audit['duplicated']})"
    )
    storm = summary["storm"]
    if storm:
        lines.append(
            f"reconnect storm                {storm['agents']:>6} agents back in "
            f"{storm['seconds']:.2f} s, {storm['left']} left behind"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="faults-summary")
    parser.add_argument("results", type=Path)
    parser.add_argument("--seed", default="?")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    records = [json.loads(line) for line in args.results.read_text().splitlines() if line]
    summary = summarize(records, args.seed)
    summary["broken"] = broken(summary)
    print(table(summary))
    print()
    print(json.dumps(summary, indent=2, sort_keys=True))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if summary["broken"]:
        print("BROKEN: " + "; ".join(summary["broken"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
