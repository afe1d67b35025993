"""The workflow on a real agent: an extension moves the end in place, so the host never loses
access in between (sampled through `jitmesh-agent check` and the lease table), and the grant
still ends at its new end."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from jitmesh.types import GrantState
from tests.e2e import procs
from tests.e2e.conftest import Mesh, wait_until
from tests.e2e.test_flow import _is, lookup_active


async def checked(state: Path) -> int:
    """`jitmesh-agent check` as a user would run it (in a thread: the agent it asks runs in
    this event loop)."""
    return await asyncio.to_thread(procs.check, state, "alice", "deploy")


async def test_extension_has_no_gap_on_the_host(mesh: Mesh) -> None:
    staging = await mesh.start_agent("web-1", "staging")
    alice = mesh.client("alice")
    _, grant = await alice.create_request(
        agent="web-1", action="deploy", duration=timedelta(seconds=3)
    )
    assert grant is not None
    await wait_until(lambda: _is(mesh, grant.id, GrantState.ACTIVE))
    assert await checked(staging.state) == 0
    extended, _ = await alice.extend_grant(grant.id, by=timedelta(seconds=4), reason="not done")
    assert extended.not_after == grant.not_after + timedelta(seconds=4)
    # Sample the host from before the first end until well after it: allowed throughout.
    samples = 0
    while datetime.now(UTC) < grant.not_after + timedelta(seconds=1.5):
        assert lookup_active(staging.state, "alice", "deploy") is not None
        assert staging.marker("alice", "deploy").exists()
        samples += 1
        await asyncio.sleep(0.02)
    assert samples > 10
    assert await checked(staging.state) == 0
    events = await mesh.client("admin").list_audit(grant_id=grant.id)
    kinds = [e.kind for e in events]
    assert kinds.count("grant.applied") == 1
    assert "grant.extended" in kinds
    # Ends at the new end, on the host too.
    await wait_until(lambda: not staging.marker("alice", "deploy").exists(), timeout=10)
    assert datetime.now(UTC) >= extended.not_after
    assert await checked(staging.state) == 1
    await wait_until(lambda: _is(mesh, grant.id, GrantState.EXPIRED))
    kinds = [e.kind for e in await mesh.client("admin").list_audit(grant_id=grant.id)]
    assert "grant.extension_applied" in kinds
