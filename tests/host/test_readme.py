"""The README's "Real privileges on the host: sudo for 15 minutes" works when pasted as written
(issue 15, "Done when"): its shell block is run by bash, as root, inside the host sandbox
(private mount, pid and network namespaces, an overlay over /etc), with Debian's real sudo,
visudo, useradd and su, a real coordinator and a real jitmesh-agent.

The only changes made to the text: `--duration 15m` becomes a few seconds. What a person does
between the commands is done the way they would: a command the README runs "in another
terminal" is started in the background and the next command waits until it is ready (the
coordinator: dev.env written and its port open; the agent: connected again, counted by its
`agent.connected` audit events); "15 minutes later" waits until the coordinator has ended the
grants and the clock has passed their end by sudo's one-second resolution (and, while an agent
runs, until it reported each removal). `/usr/bin/systemctl` is replaced inside the sandbox by a
program that prints what it was asked to do and as whom: there is no systemd to restart `app`
in a namespace, and what is tested is sudo allowing and refusing it.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.host import sandbox

ROOT = Path(__file__).resolve().parents[2]
TITLE = "## Real privileges on the host: sudo for 15 minutes"
SECONDS = 10

# What "ready" means for each program the walkthrough keeps running (bash conditions).
READY = {
    "jitmesh-coordinator": (
        "test -s dev/dev.env && python3 -c 'import socket; "
        'socket.create_connection(("127.0.0.1", 7443), 1)\''
    ),
    "jitmesh-agent": '[ "$(__count agent.connected)" -gt "$__connected" ]',
}

PRELUDE = """\
set -euo pipefail
__wait() {  # poll a condition (90 s at most), as a person watching the other terminal would
  for _ in $(seq 900); do
    if eval "$1" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "not ready after 90s: $1" >&2
  return 1
}
__count() {  # how many audit events of kind $1 web-1 has
  JITMESH_TOKEN=$JITMESH_TOKEN_ADMIN jitctl audit list --agent web-1 --kind "$1" -o json \\
    | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))'
}
__later() {  # "15 minutes later": every grant ended on the coordinator, the clock 1 s past
  # the last end, and, while an agent runs, each expiry reported by it
  JITMESH_TOKEN=$JITMESH_TOKEN_ADMIN jitctl grant list --agent web-1 --all -o json \\
    | python3 -c '
import json, subprocess, sys
from datetime import UTC, datetime, timedelta
grants = json.load(sys.stdin)
ends = [datetime.fromisoformat(g["not_after"].replace("Z", "+00:00")) for g in grants]
done = all(g["state"] not in ("ACTIVE", "PENDING_DELIVERY") for g in grants)
late = datetime.now(UTC) >= max(ends) + timedelta(seconds=1)
running = subprocess.run(["pidof", "-x", "jitmesh-agent"], capture_output=True).returncode == 0
expired = sum(g["state"] == "EXPIRED" for g in grants)
sys.exit(not (done and late and (not running or int(sys.argv[1]) >= expired)))
' "$(__count agent.grant.expired)"
}
__connected=0
"""


def walkthrough() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(TITLE, 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```sh\n(.*?)```", section, re.S)
    assert found is not None, "the sudo walkthrough has no sh block"
    return found.group(1)


def script() -> str:
    """The block as a bash script: continuation lines joined, comment lines turned into what a
    person does there (a step marker; a wait for "15 minutes later"; the next command started
    in the background for "in another terminal")."""
    parts = [PRELUDE]
    lines = walkthrough().splitlines()
    background = False
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            step = re.match(r"#\s*(\d+)\.", line.strip())
            if step:
                parts.append(f'echo "=== step {step.group(1)}"')
            lowered = line.lower()
            background = background or "in another terminal" in lowered
            if "15 minutes later" in lowered:
                parts.append("__wait __later")
            continue
        command = line
        while command.endswith("\\"):
            command = command[:-1] + lines[i].strip()
            i += 1
        command = command.replace("--duration 15m", f"--duration {SECONDS}s")
        if not background:
            parts.append(command)
            continue
        program = command.split()[0]
        assert program in READY, f"no readiness check for {program}"
        if program == "jitmesh-agent":
            parts.append("__connected=$(__count agent.connected 2>/dev/null || echo 0)")
        parts.append(f"( exec {command} ) >> bg-{program}.log 2>&1 &")
        parts.append(f"__wait {_quote(READY[program])}")
        background = False
    parts.append(
        "JITMESH_TOKEN=$JITMESH_TOKEN_ADMIN jitctl grant list --agent web-1 --all -o json"
        " > grants.json"
    )
    return "\n".join(parts) + "\n"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def steps(stdout: str) -> dict[int, str]:
    found: dict[int, str] = {}
    for chunk in re.split(r"^=== step ", stdout, flags=re.M)[1:]:
        number, _, body = chunk.partition("\n")
        found[int(number)] = body
    return found


def test_the_walkthrough_has_what_the_issue_asks_for() -> None:
    block = walkthrough()
    assert 'restart = ["/usr/bin/systemctl restart app"]' in block
    assert "--enforcer sudo:/etc/jitmesh/agent.toml" in block
    assert block.count("--duration 15m") == 3
    assert "kill -9 $(pidof -x jitmesh-agent)" in block
    assert "--release --request" in block


def test_the_sudo_walkthrough_ends_access_on_time_with_and_without_the_agent(
    tmp_path: Path,
) -> None:
    seen = sandbox.run(tmp_path, "readme_sudo", script(), timeout=240)
    rc, out = seen["rc"], seen["output"]
    logs = "\n".join(f"--- {name}\n{text[-2500:]}" for name, text in seen["logs"].items())
    assert rc == 0, f"{out[-6000:]}\n{logs}"
    step = steps(out)
    assert sorted(step) == list(range(1, 10)), out
    # 4: the drop-in with the grant's window in UTC; alice may run exactly the mapped command.
    window = r"NOTBEFORE=\d{14}Z NOTAFTER=\d{14}Z NOPASSWD: /usr/bin/systemctl restart app"
    assert re.search(window, step[4]), step[4]
    assert "systemctl restart app: done as root" in step[4]
    assert "refused: not the mapped command" in step[4]
    assert "systemctl stop" not in step[4]
    # 5: expired with the agent running: drop-in gone, refused, audited by the agent.
    assert "jitmesh_alice__restart" not in step[5]
    assert "refused: expired" in step[5]
    assert "agent.grant.expired" in step[5]
    # 7: the agent dead: the drop-in still there, sudo refuses it on its own.
    assert "NOTAFTER=" in step[7]
    assert "refused: past NOTAFTER" in step[7]
    assert "done as root" not in step[7]
    # 8: the agent started again removed it before anything else.
    assert "jitmesh_alice__restart" not in step[8]
    # 9: exec --request --release: filed as alice, ran, released; then refused again.
    assert re.search(r"request req-\w+ approved", step[9]), step[9]
    assert "systemctl restart app: done as root" in step[9]
    assert re.search(r"grant grt-\w+ released", step[9]), step[9]
    assert "refused: released" in step[9]
    # The coordinator's record: two grants expired, the exec one released.
    assert [g["state"] for g in seen["grants"]] == ["RELEASED", "EXPIRED", "EXPIRED"]
    assert {g["subject"] for g in seen["grants"]} == {"alice"}
