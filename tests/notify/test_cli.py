"""jitctl notify (a real jitctl process against a real coordinator): receivers added, listed
without their secrets, removed; the delivery log."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

from jitmesh.clock import FakeClock
from server.domain.receivers import Route
from server.notify.webhook import WebhookVerifier
from tests.e2e.procs import jitctl
from tests.notify.servers import HttpRecorder
from tests.notify.test_outbox import file_prod_request, running, verifying
from tests.server.helpers import ADMIN, TOKENS


async def test_receivers_and_log_with_jitctl(tmp_path: Path, recorder: HttpRecorder) -> None:
    secret = tmp_path / "hook.secret"
    secret.write_text("cli-webhook-secret\n")
    recorder.answer = verifying(WebhookVerifier(b"cli-webhook-secret"))
    async with running(tmp_path / "c", FakeClock(datetime.now(UTC))) as (coordinator, clients):
        admin = {"JITMESH_COORDINATOR": f"127.0.0.1:{coordinator.port}",
                 "JITMESH_TOKEN": TOKENS["admin"]}  # fmt: skip
        code, out, err = await jitctl(
            "notify", "receiver", "add", "ops-hook", "--kind", "webhook",
            "--target", recorder.url, "--secret-file", str(secret),
            "--event", "request.created", "--label", "env=prod", env=admin,
        )  # fmt: skip
        assert code == 0, err
        assert out.strip() == "added receiver ops-hook (webhook)"
        code, out, err = await jitctl("notify", "receiver", "list", "-o", "json", env=admin)
        assert code == 0, err
        [listed] = json.loads(out)
        assert listed["secret"] == "stored"
        assert "cli-webhook-secret" not in out
        assert listed["agent_labels"] == {"env": "prod"}
        bob = {**admin, "JITMESH_TOKEN": TOKENS["bob"]}
        code, _, err = await jitctl("notify", "receiver", "list", env=bob)
        assert code != 0
        assert "admins" in err
        request_id = await file_prod_request(clients["alice"])
        # Every message for an approver links to the request's page; so does request show.
        code, out, err = await jitctl(
            "request", "show", request_id,
            env={**admin, "JITMESH_WEB_URL": "https://jit.example.com/"},
        )  # fmt: skip
        assert code == 0, err
        assert f"https://jit.example.com/requests/{request_id}" in out
        await recorder.wait_for(lambda r: len(r) == 1)
        assert coordinator.sender is not None
        async with asyncio.timeout(10):
            while coordinator.sender.attempts < 1:
                await asyncio.sleep(0.01)
        code, out, err = await jitctl("notify", "log", "-o", "json", env=admin)
        assert code == 0, err
        [entry] = json.loads(out)
        assert (entry["receiver"], entry["event"], entry["state"], entry["request"]) == (
            "ops-hook", "request.created", "DELIVERED", request_id,
        )  # fmt: skip
        code, out, _ = await jitctl("notify", "log", env=admin)
        assert "DELIVERED" in out
        code, out, err = await jitctl("notify", "receiver", "remove", "ops-hook", env=admin)
        assert code == 0, err
        code, out, _ = await jitctl("notify", "receiver", "list", "-o", "json", env=admin)
        assert json.loads(out) == []


async def test_jitctl_request_show_prints_the_link_the_notices_carry(
    tmp_path: Path, recorder: HttpRecorder
) -> None:
    recorder.answer = verifying(WebhookVerifier(b"cli-webhook-secret"))
    async with running(tmp_path / "c", FakeClock(datetime.now(UTC))) as (coordinator, clients):
        assert coordinator.receivers is not None
        await coordinator.receivers.add(
            ADMIN, name="hook", kind="webhook", settings={"url": recorder.url},
            secret="cli-webhook-secret", route=Route(kinds=("request.created",)),
        )  # fmt: skip
        request_id = await file_prod_request(clients["alice"])
        [notice] = await recorder.wait_for(lambda r: len(r) == 1)
        link = notice.json()["link"]
        assert link == f"https://jit.example.com/requests/{request_id}"
        # Nothing on the client says where jitmesh-web is: the coordinator does.
        bob = {"JITMESH_COORDINATOR": f"127.0.0.1:{coordinator.port}",
               "JITMESH_TOKEN": TOKENS["bob"], "JITMESH_WEB_URL": ""}  # fmt: skip
        code, out, err = await jitctl("request", "show", request_id, env=bob)
        assert code == 0, err
        assert ["LINK", link] in [line.split() for line in out.splitlines()]
        code, out, err = await jitctl("request", "show", request_id, "-o", "json", env=bob)
        assert code == 0, err
        assert json.loads(out)["link"] == link
        # The SDK's value carries it too.
        assert (await clients["bob"].get_request(request_id)).link == link
