"""scripts/bench: run the scenarios, print the table, write JSON. The exit code reports errors
only (a scenario that failed to run), never slowness."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from . import fleetlock, replicas, web
from . import scenarios as sc
from .stats import Row, Scenario

GROUPS: dict[
    str, tuple[set[str], Callable[[Path, sc.Sizes], Coroutine[Any, Any, list[Scenario]]]]
] = {
    "local": ({"1", "2", "8", "15"}, sc.local),
    "local-tls": ({"13"}, sc.local_tls),
    "web": ({"16"}, web.run),
    "expiry": ({"7"}, sc.expiry),
    "fleet": ({"3", "4", "5"}, sc.fleet),
    "reconnect": ({"6"}, sc.reconnect),
    "fleet-tls": ({"14"}, sc.fleet_tls),
    "replicas": ({"9", "10", "11"}, replicas.run),
    "delivery": ({"12"}, sc.flood),
    "failover": ({"17"}, replicas.failover),
    "locks": ({"20"}, fleetlock.run),
}
# Not in `--quick` unless asked for with --only: each would add a minute or more to CI's run
# (another 1,000-agent swarm enrolling with CSRs; two more PostgreSQL replicas).
FULL_ONLY = {"fleet-tls", "failover"}
# How long a group's event loop waits, once its scenarios returned, for the tasks they left
# running (`_until_settled`): gRPC's own, about 0.2 s after 1,000 links; a task still running
# then is named on stderr.
SETTLE_WITHIN = 30.0

log = logging.getLogger("bench")


async def _group(
    run: Callable[[Path, sc.Sizes], Coroutine[Any, Any, list[Scenario]]],
    tmp: Path,
    sizes: sc.Sizes,
) -> list[Scenario]:
    """One group's scenarios, in the group's own event loop; the loop is closed only after
    every task started in it has ended (`_until_settled`)."""
    try:
        return await run(tmp, sizes)
    finally:
        await _until_settled(SETTLE_WITHIN)


async def _until_settled(within: float) -> None:
    """Wait until no other task runs on this loop, at most `within` seconds.

    Closing a gRPC channel cancels its calls without waiting for gRPC's side of them: each
    cancelled streaming call keeps a task of grpc's (`_AioCall._handle_status_once_received`)
    until the core's completion arrives, a moment later, through grpc's one process-wide
    poller. Were the loop closed first (`asyncio.run` cancels what is left, then closes), those
    completions would reach the next group's loop that uses gRPC, which hands each one to the
    closed loop: an "Event loop is closed" traceback per completion (1,719 of them after the
    fleet group's 1,000 links in a quick run). Left to finish, each call ends in its own loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    me = asyncio.current_task()
    while others := [task for task in asyncio.all_tasks() if task is not me]:
        remaining = deadline - loop.time()
        if remaining <= 0:
            names = Counter(_task_name(task) for task in others)
            log.error(
                "%d tasks still running %.0f s after the scenarios returned (cancelled now): %s",
                len(others), within, ", ".join(f"{n} x{c}" for n, c in names.most_common()),
            )  # fmt: skip
            return
        await asyncio.wait(others, timeout=remaining)


def _task_name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return str(getattr(coro, "__qualname__", None) or task.get_name())


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "-"
    if unit in ("ms",):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def table(results: list[Scenario]) -> str:
    head = ("scenario", "metric", "jitmesh", "baseline", "ratio", "unit", "target", "status")
    lines: list[tuple[str, ...]] = [head]
    for s in results:
        if s.error:
            lines.append((s.name, "ERROR", s.error[:60], "", "", "", "", ""))
        row: Row
        for row in s.rows:
            r = row.ratio
            lines.append(
                (
                    s.name,
                    row.metric,
                    fmt(row.jitmesh, row.unit),
                    fmt(row.baseline, row.unit),
                    "-" if math.isnan(r) else f"{r:.2f}x",
                    row.unit,
                    row.target,
                    row.status,
                )
            )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for k, line in enumerate(lines):
        out.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes (about 3 minutes)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument(
        "--only", default="", help="comma-separated scenario numbers, e.g. 1,2,7 (default: all)"
    )
    p.add_argument("--agents", type=int, help="agents for scenarios 3-6 (overrides the size)")
    p.add_argument("--profile", type=Path, help="py-spy the coordinator into this directory")
    p.add_argument(
        "--native",
        action="store_true",
        help="with --profile: native frames too (py-spy --native, 100 Hz; slows the process)",
    )
    p.add_argument(
        "--perf",
        action="store_true",
        help="with --profile: Linux perf instead of py-spy (threads and libraries, native only)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    sizes = sc.Sizes.quick() if args.quick else sc.Sizes.full()
    if args.agents:
        sizes = sc.Sizes(**{**sizes.__dict__, "agents": args.agents})
    sc.PROFILE_DIR = args.profile
    sc.PROFILE_NATIVE = args.native
    sc.PROFILE_PERF = args.perf
    wanted = set(filter(None, args.only.split(",")))
    sc.WANTED = wanted
    work = Path(tempfile.mkdtemp(prefix="jitmesh-bench."))
    results: list[Scenario] = []
    started = time.monotonic()
    failed = False
    for group, (numbers, run) in GROUPS.items():
        if wanted and not numbers & wanted:
            continue
        if args.quick and not wanted and group in FULL_ONLY:
            continue
        print(f"bench: running {group} scenarios ({','.join(sorted(numbers))})", file=sys.stderr)
        (work / group).mkdir()
        try:
            found: list[Scenario] = asyncio.run(_group(run, work / group, sizes))
        except Exception as exc:
            failed = True
            found = [Scenario(group, "", "", error=f"{type(exc).__name__}: {exc}")]
            log.exception("scenario group %s failed", group)
        failed |= any(s.error for s in found)
        results += [s for s in found if not wanted or s.name.split()[0] in wanted or s.error]
    total = time.monotonic() - started
    sys.stderr.flush()
    print(f"\njitmesh benchmarks ({'quick' if args.quick else 'full'}), {total:.0f} s")
    for s in results:
        if not s.error:
            print(f"  {s.name}: {s.size}. {s.real}")
    print()
    print(table(results))
    explained = [(f"{s.name}: {r.metric}", r.note) for s in results for r in s.rows if r.note]
    if explained:
        print("\nWhat the figures mean:")
        for what, note in explained:
            print(f"  {what}: {note}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "mode": "quick" if args.quick else "full",
            "seconds": total,
            "machine": machine(),
            "scenarios": [
                {
                    "name": s.name,
                    "size": s.size,
                    "real": s.real,
                    "seconds": s.seconds,
                    "error": s.error,
                    "rows": [row.as_json() for row in s.rows],
                    "extra": s.extra,
                }
                for s in results
            ],
        }
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    if args.keep or failed:
        print(f"bench: work directory kept: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
