"""The coordinator is killed with SIGKILL while many callers create requests at once (so they are
written in shared group-commit batches): every request a caller got an answer for is there
after the restart, whole (approved, its grant, its command in the agent's gap-free log), and
the audit chain verifies."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from pathlib import Path

import pytest

from jitmesh import Client, GrantState, JitmeshError, RequestState

from .procs import Proc, agent, coordinator, free_port, read_env, wait_for, wait_healthy
from .test_crash_expiry import wait_for_agent

pytestmark = pytest.mark.subprocess

CALLERS = 24
KILL_AFTER = 60


async def test_every_acknowledged_create_survives_a_kill_mid_batch(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    coord = coordinator(tmp_path / "coordinator", port)
    access = tmp_path / "access"
    access.mkdir()
    coord.start()
    web: Proc | None = None
    try:
        await wait_healthy(address)
        await wait_for(lambda: (tmp_path / "coordinator" / "dev.env").exists(), 20, "dev.env")
        env = read_env(tmp_path / "coordinator" / "dev.env")
        web = agent(
            address, "web-1", "env=staging", env["JITMESH_JOIN_TOKEN"], tmp_path / "web-1", access
        )
        web.start()
        acknowledged: dict[str, str] = {}
        enough = asyncio.Event()
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ALICE"]) as alice:
            await wait_for_agent(alice, "web-1")

            async def caller() -> None:
                with contextlib.suppress(JitmeshError):
                    while True:
                        request, grant = await alice.create_request(
                            agent="web-1", action="deploy", duration=timedelta(hours=1)
                        )
                        assert grant is not None
                        acknowledged[request.id] = grant.id
                        if len(acknowledged) >= KILL_AFTER:
                            enough.set()

            callers = [asyncio.ensure_future(caller()) for _ in range(CALLERS)]
            try:
                await asyncio.wait_for(enough.wait(), 60)
                coord.kill()  # SIGKILL with creates in flight: no chance to finish anything
                # Callers end on their own: the coordinator is gone, every call fails.
                await asyncio.wait_for(asyncio.gather(*callers), 60)
            finally:
                for task in callers:
                    task.cancel()
        coord.start()
        await wait_healthy(address)
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ADMIN"]) as admin:
            seqs = []
            for request_id, grant_id in acknowledged.items():
                request = await admin.get_request(request_id)
                assert request.state is RequestState.APPROVED
                assert request.grant_id == grant_id
                grant = await admin.get_grant(grant_id)
                assert grant.state in {GrantState.PENDING_DELIVERY, GrantState.ACTIVE}
                seqs.append(grant.grant_seq)
            assert len(set(seqs)) == len(seqs)
            # The agent's log has no gaps: every stored grant's command 1..n, whatever the
            # callers heard (some were committed and then lost their answer to the kill).
            stored = await admin.list_grants(agent="web-1")
            assert sorted(g.grant_seq for g in stored) == list(range(1, len(stored) + 1))
            assert set(acknowledged.values()) <= {g.id for g in stored}
            verification = await admin.verify_audit()
            assert verification.ok, verification.problem
    finally:
        if web is not None:
            web.stop()
        coord.stop()
