"""Audit archives: `jitctl audit export --from/--to` ranges verify together with the rest of
the chain (`scripts/verify_audit_export A B`), and a gap, a rewrite or a range alone does not."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from tests.e2e import procs
from tests.security.test_audit_export import verify, write
from tests.server.helpers import TOKENS, Env


async def _export(env: Env, *argv: str) -> list[dict[str, object]]:
    code, stdout, stderr = await procs.jitctl(
        "--coordinator", env.address, "audit", "export", *argv,
        env={"JITMESH_TOKEN": TOKENS["admin"]},
    )  # fmt: skip
    assert code == 0, stderr
    return [json.loads(line) for line in stdout.splitlines()]


def _events(records: list[dict[str, object]]) -> list[int]:
    return [int(str(r["seq"])) for r in records if r["type"] == "event"]


async def test_archive_ranges_verify_with_the_live_chain(env: Env, tmp_path: Path) -> None:
    assert env.coordinator.checkpoints is not None
    for _ in range(3):
        await env.alice.create_request(agent="web-1", action="logs", duration=timedelta(minutes=1))
    middle, _ = await env.coordinator.store.audit_head()
    await env.coordinator.checkpoints.append(env.clock.now())
    for _ in range(2):
        await env.alice.create_request(agent="web-1", action="logs", duration=timedelta(minutes=1))
    last, _ = await env.coordinator.store.audit_head()
    await env.coordinator.checkpoints.append(env.clock.now())

    archive = await _export(env, "--to", str(middle))
    live = await _export(env, "--from", str(middle + 1))
    assert _events(archive) == list(range(1, middle + 1))
    assert _events(live) == list(range(middle + 1, last + 1))
    a, b = tmp_path / "archive.jsonl", tmp_path / "live.jsonl"
    write(a, archive)
    write(b, live)

    code, message = verify(env, a, b)
    assert (code, message) == (0, f"ok: {last} events, 2 checkpoints"), message
    # The archive alone verifies up to its own checkpoint...
    assert verify(env, a)[0] == 0
    # ...the live range alone does not: it does not start at the beginning of the chain.
    code, message = verify(env, b)
    assert code == 1
    assert message.startswith("seq 1: missing")
    # A gap between the files is named.
    write(a, [r for r in archive if r.get("seq") != middle or r["type"] != "event"])
    code, message = verify(env, a, b)
    assert code == 1
    assert message.startswith(f"seq {middle}: missing")
    # Overlapping files must agree.
    rewritten = [
        dict(r, actor="mallory") if r["type"] == "event" and r["seq"] == middle else r
        for r in archive
    ]
    write(a, rewritten)
    write(b, await _export(env, "--from", str(middle)))
    code, message = verify(env, a, b)
    assert (code, message) == (1, f"seq {middle}: differs between the files (rewritten)")


async def test_a_reversed_range_is_a_usage_error(env: Env) -> None:
    code, _out, err = await procs.jitctl(
        "--coordinator", env.address, "audit", "export", "--from", "5", "--to", "2",
        env={"JITMESH_TOKEN": TOKENS["admin"]},
    )  # fmt: skip
    assert code == 2
    assert err.strip() == "jitctl: --to must not be below --from"
