"""The oracle enforcer: an exec-enforcer hook script that really adds and removes a marker file per
(subject, action) and appends a wall-clock-stamped line for each change to a log, so the suite
measures overstay from what happened on the "host", not from what the agent says.

Control files in the oracle directory make hooks misbehave on demand: `fail-apply`,
`fail-remove` (exit 1), `hang-apply`, `hang-remove` (sleep until the hook timeout kills the
process group) and `half-apply` (create the marker, then fail: a half-done apply to roll back).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SCRIPT = r"""#!/bin/sh
# jitmesh fault-suite oracle hook (test only)
# A full-disk test limits the agent's file size (inherited here): the host's record must not be.
ulimit -S -f unlimited 2>/dev/null
d="$ORACLE_DIR"; op="$1"; s="$2"; a="$3"
if [ -e "$d/hang-$op" ]; then
  echo $$ > "$d/hang.pid"; echo "$(date +%s%N) hang-$op $s $a" >> "$d/log"; exec sleep 30
fi
if [ -e "$d/fail-$op" ]; then echo "$(date +%s%N) fail-$op $s $a" >> "$d/log"; exit 1; fi
case "$op" in
  apply)
    : > "$d/in/$s:$a"; echo "$(date +%s%N) apply $s $a" >> "$d/log"
    if [ -e "$d/half-apply" ]; then exit 1; fi ;;
  remove)
    if [ -e "$d/in/$s:$a" ]; then
      rm -f "$d/in/$s:$a"; echo "$(date +%s%N) remove $s $a" >> "$d/log"
    fi ;;
  observe)
    echo x >> "$d/observes"
    for f in "$d"/in/*; do
      [ -e "$f" ] || continue; b=$(basename "$f"); echo "${b%%:*} ${b#*:}"
    done ;;
esac
"""


@dataclass
class Oracle:
    root: Path

    def __post_init__(self) -> None:
        (self.root / "in").mkdir(parents=True, exist_ok=True)
        (self.root / "log").touch()
        (self.root / "oracle.sh").write_text(SCRIPT)

    def hooks_yaml(self, timeout: str = "1s") -> Path:
        script = self.root / "oracle.sh"
        path = self.root / "hooks.yaml"
        path.write_text(
            f'apply: [/bin/sh, "{script}", apply, "{{subject}}", "{{action}}"]\n'
            f'remove: [/bin/sh, "{script}", remove, "{{subject}}", "{{action}}"]\n'
            f'observe: [/bin/sh, "{script}", observe]\n'
            f"timeout: {timeout}\n"
            f'env: {{ORACLE_DIR: "{self.root}"}}\n'
        )
        return path

    def misbehave(self, what: str, on: bool = True) -> None:
        flag = self.root / what
        if on:
            flag.touch()
        else:
            flag.unlink(missing_ok=True)

    def kill_hung_hook(self) -> None:
        """A hook left hanging by a SIGKILLed agent (its own session): end it by its pid."""
        pid_file = self.root / "hang.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
            pid_file.unlink()

    def observes(self) -> int:
        """How many times the agent has looked at the host (its reconcile runs `observe`)."""
        path = self.root / "observes"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def in_force(self) -> set[tuple[str, str]]:
        found = set()
        for marker in (self.root / "in").iterdir():
            subject, _, action = marker.name.partition(":")
            found.add((subject, action))
        return found

    def history(self) -> History:
        events: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
        for line in (self.root / "log").read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:
                events[(parts[2], parts[3])].append((int(parts[0]), parts[1]))
        return History(dict(events))


@dataclass
class History:
    events: dict[tuple[str, str], list[tuple[int, str]]] = field(default_factory=dict)

    def applies(self, pair: tuple[str, str]) -> list[int]:
        return [t for t, op in self.events.get(pair, []) if op == "apply"]

    def removes(self, pair: tuple[str, str]) -> list[int]:
        return [t for t, op in self.events.get(pair, []) if op == "remove"]

    def double_applies(self, pair: tuple[str, str]) -> int:
        """Applies while the pair was already in force (no remove in between)."""
        count, held = 0, False
        for _, op in sorted(self.events.get(pair, [])):
            if op == "apply":
                count += held
                held = True
            elif op == "remove":
                held = False
        return count

    def in_force_at_end(self, pair: tuple[str, str]) -> bool:
        state = False
        for _, op in sorted(self.events.get(pair, [])):
            if op in ("apply", "remove"):
                state = op == "apply"
        return state


def now_ns() -> int:
    return time.time_ns()
