"""Warnings before access ends: one grant.expiring notice per grant end, delivered to the
receivers that route it, never twice (not after a restart either)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from jitmesh.clock import FakeClock
from jitmesh.types import GrantState
from server.domain.expiring import ExpiryWarnings
from server.domain.hub import Hub
from server.domain.models import GrantChange
from server.notify.webhook import WebhookVerifier
from tests.notify.servers import HttpRecorder, Received
from tests.notify.test_outbox import SECRET, add_webhook, kinds, running


async def test_each_grant_is_warned_once_before_it_ends(
    tmp_path: Path, recorder: HttpRecorder
) -> None:
    clock = FakeClock(datetime.now(UTC))
    verifier = WebhookVerifier(SECRET.encode())

    def answer(item: Received) -> tuple[int, Any]:
        # The coordinator's clock runs ahead of the wall clock here: check against it.
        try:
            verifier.verify(item.headers, item.body, clock.now())
        except ValueError as exc:
            return 401, {"error": str(exc)}
        return 200, {"ok": True}

    recorder.answer = answer
    async with running(tmp_path / "c", clock) as (coordinator, clients):
        await add_webhook(coordinator, recorder.url, kinds=("grant.expiring",))
        _, grant = await clients["alice"].create_request(
            agent="web-1", action="deploy", duration=timedelta(minutes=15), reason=""
        )
        assert grant is not None
        # As if the agent had applied it (the agent side is tested elsewhere).
        async with coordinator.store.transaction() as tx:
            moved = await tx.move_grant(
                grant.id, expected=[GrantState.PENDING_DELIVERY], state=GrantState.ACTIVE,
                change=GrantChange(applied_at=clock.now()),
            )  # fmt: skip
            assert moved
        warnings = coordinator.warnings
        assert warnings is not None
        # 11 minutes left: not yet (asked directly: the running loop sleeps on the clock).
        assert await warnings.warn_due(clock.now() + timedelta(minutes=4)) == 0
        # 9 minutes left: the loop wakes on the clock and warns.
        await clock.advance(timedelta(minutes=6))
        [warned] = await recorder.wait_for(lambda r: len(r) == 1)
        body = warned.json()
        assert (body["kind"], body["grant_id"], body["subject"]) == (
            "grant.expiring", grant.id, "alice",
        )  # fmt: skip
        assert body["details"]["left"] == "9m"
        assert body["link"].endswith(f"/requests/{grant.request_id}")
        assert kinds(recorder.received) == ["grant.expiring"]
        # Another process (a restart, a replica) warns nobody twice either.
        again = ExpiryWarnings(coordinator.store, Hub(), clock, timedelta(minutes=10))
        assert await again.warn_due(clock.now()) == 0
    assert len(recorder.received) == 1
