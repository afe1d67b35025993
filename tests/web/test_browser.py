"""jitmesh-web in a real headless browser: Debian's chromium driven by Playwright (never a
browser Playwright downloads), against a real jitmesh-web process, a real coordinator and a
real agent process applying grants with its file enforcer.

alice signs in and files a request in the browser; the request reaches approvers by webhook,
Slack (its Web API, answered by a local server) and e-mail (a real SMTP server over STARTTLS); a
developer who may not review cannot approve it even by posting the form himself; bob approves
in a second browser context; alice's page turns APPROVED and then ACTIVE when the agent has
applied the grant on the host, and alice is told both by e-mail. Forms without their CSRF
token, and a form edited to act as someone else, change nothing. With JITMESH_SCREENSHOTS=DIR
the main pages are saved there (docs/web-*.png were made so)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from email import message_from_bytes
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, expect

from jitmesh.clock import SystemClock
from server.app import Coordinator
from server.domain.receivers import Route
from server.notify.render import APPROVE, DENY
from server.notify.webhook import WebhookVerifier
from tests.e2e.procs import agent, check, wait_for
from tests.notify.servers import HttpRecorder, SmtpServer
from tests.notify.test_outbox import SECRET, kinds, running, verifying
from tests.server.helpers import ADMIN
from tests.web.browsing import csrf_of, shot, sign_in, start_web, stopping


async def test_request_in_the_browser_approved_by_another_person_applied_on_the_host(
    tmp_path: Path,
    recorder: HttpRecorder,
    smtp: SmtpServer,
    tls_files: tuple[Path, Path, Path],
    browser: Browser,
) -> None:
    recorder.answer = verifying(WebhookVerifier(SECRET.encode()))
    slack = HttpRecorder(asyncio.get_running_loop()).start()
    slack.answer = lambda _: (200, {"ok": True, "ts": "1.1"})  # Slack's Web API
    async with running(tmp_path / "c", SystemClock()) as (coordinator, clients):
        assert coordinator.receivers is not None
        await coordinator.receivers.add(
            ADMIN, name="hook", kind="webhook", settings={"url": recorder.url},
            secret=SECRET, route=Route(),
        )  # fmt: skip
        await coordinator.receivers.add(
            ADMIN, name="slack", kind="slack",
            settings={"channel": "C0APPROVERS", "api_url": slack.url, "users": "U0BOB=bob"},
            secret="xoxb-bot-token", route=Route(kinds=("request.created",)),
        )  # fmt: skip
        await coordinator.receivers.add(
            ADMIN, name="mail", kind="email",
            settings={
                "host": "127.0.0.1", "port": str(smtp.port), "sender": "jit@example.com",
                "to": "sre@example.com", "requester_domain": "corp.example",
                "ca_file": str(tls_files[2]),
            },
            secret="", route=Route(kinds=("request.created",), requester=True),
        )  # fmt: skip
        join, _ = await coordinator.fleet.create_join_token(ADMIN, {"env": "prod"}, None)
        state, access = tmp_path / "prod-1", tmp_path / "prod-1-access"
        access.mkdir()
        host = agent(f"127.0.0.1:{coordinator.port}", "prod-1", "env=prod", join, state, access)
        host.start()
        web, base = await start_web(coordinator.port, tmp_path / "web.log", "--dev-token-sign-in")
        try:
            with stopping(web):
                await wait_for(
                    lambda: (state / "agent.db").exists(), 30, "the agent to open its lease table"
                )
                await _walk(coordinator, clients, base, browser, recorder, state, slack, smtp)
        finally:
            host.stop()
            slack.stop()


async def _walk(
    coordinator: Coordinator,
    clients: dict[str, Any],
    base: str,
    browser: Browser,
    recorder: HttpRecorder,
    state: Path,
    slack: HttpRecorder,
    smtp: SmtpServer,
) -> None:
    alice_ctx, alice = await sign_in(browser, base, "alice")
    cookie = next(c for c in await alice_ctx.cookies() if c["name"] == "jm_session")
    assert cookie["httpOnly"] is True
    assert cookie["secure"] is True
    assert cookie["sameSite"] == "Strict"
    response = await alice.goto(base + "/requests/new")
    assert response is not None
    csp = await response.header_value("content-security-policy")
    assert csp is not None
    assert "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    await shot(alice, "new-request")

    # A form edited to act as someone else: the extra field changes nothing.
    await alice.select_option("#option", "prod-1 deploy")
    await alice.select_option("#duration", "30m")
    await alice.fill("#reason", "release 2.4")
    await alice.evaluate(
        """() => { const f = document.getElementById('new-request');
                   for (const [k, v] of [['subject', 'bob'], ['user', 'bob']]) {
                     const i = document.createElement('input');
                     i.type = 'hidden'; i.name = k; i.value = v; f.appendChild(i); } }"""
    )
    await alice.click("text=File request")
    await expect(alice.locator("#request-state")).to_have_text("PENDING")
    await expect(alice.locator("#subject")).to_have_text("alice")
    request_id = alice.url.rsplit("/", 1)[1]
    # It reaches the approvers by webhook, Slack (with Approve and Deny) and e-mail.
    got = await recorder.wait_for(lambda r: "request.created" in kinds(r))
    assert any(r.json()["request_id"] == request_id for r in got)
    [message] = await slack.wait_for(lambda r: len(r) == 1)
    assert message.path == "/chat.postMessage"
    assert message.json()["channel"] == "C0APPROVERS"
    [buttons] = [b for b in message.json()["blocks"] if b["type"] == "actions"]
    assert {e["action_id"]: e["value"] for e in buttons["elements"]} == {
        APPROVE: request_id, DENY: request_id,
    }  # fmt: skip
    assert f"https://jit.example.com/requests/{request_id}" in json.dumps(message.json()["blocks"])
    [mail] = await smtp.wait_for(1)
    assert mail.rcpt_tos == ["sre@example.com"]
    assert f"/requests/{request_id}".encode() in (mail.original_content or b"")
    await shot(alice, "request-pending")

    # The same form without its CSRF token: refused, nothing filed.
    before = len(await clients["alice"].list_requests())
    forged = await alice.request.post(
        base + "/requests",
        form={"option": "prod-1 deploy", "duration": "15m", "reason": "x"},
        max_redirects=0,
    )
    assert forged.status == 403
    assert len(await clients["alice"].list_requests()) == before

    # dave (developers) may not review, nor read alice's request (the read matrix,
    # THREAT_MODEL.md): not found, no buttons, and posting the form himself does nothing.
    dave_ctx, dave = await sign_in(browser, base, "dave")
    await dave.goto(f"{base}/requests/{request_id}")
    await expect(dave.locator("main")).to_contain_text("No such request")
    assert await dave.locator("#review").count() == 0
    posted = await dave.request.post(
        f"{base}/requests/{request_id}/review",
        form={"csrf": await csrf_of(dave), "decision": "approve", "reason": "me"},
    )
    assert posted.status == 404
    assert "No such request" in await posted.text()
    # Without the CSRF token even the form's own fields are refused.
    refused = await dave.request.post(
        f"{base}/requests/{request_id}/review", form={"decision": "approve"}, max_redirects=0
    )
    assert refused.status == 403
    assert (await clients["alice"].get_request(request_id)).reviews == ()
    await dave_ctx.close()

    # bob, in his own browser context, sees it waiting for him and approves.
    bob_ctx, bob = await sign_in(browser, base, "bob")
    await expect(bob.locator("#to-review")).to_contain_text("deploy on prod-1")
    await shot(bob, "overview-approver")
    await bob.click("#to-review >> text=deploy on prod-1")
    await expect(bob.locator("#history-h")).to_have_text("alice's other requests")
    await shot(bob, "request-approver")
    await bob.fill("#review-reason", "looks right")
    await bob.click("#review >> text=Approve")
    await expect(bob.locator(".flash.ok")).to_have_text("Approved.")

    # alice's page follows by itself: approved, then applied on the host.
    await expect(alice.locator("#request-state")).to_have_text("APPROVED", timeout=15_000)
    await expect(alice.locator("#grant-state")).to_have_text("ACTIVE", timeout=30_000)
    assert check(state, "alice", "deploy") == 0
    await shot(alice, "request-applied")
    await recorder.wait_for(lambda r: {"request.approved", "grant.applied"} <= set(kinds(r)))
    # alice is told by e-mail: approved, then applied on the host.
    mails = await smtp.wait_for(3)
    to_alice = [m for m in mails if m.rcpt_tos == ["alice@corp.example"]]
    subjects = sorted(_subject(m.original_content or b"") for m in to_alice)
    assert subjects == [
        "[jitmesh] Access applied on the host: alice deploy on prod-1",
        "[jitmesh] Request approved: alice deploy on prod-1",
    ]

    # Her live access, released from the overview.
    await alice.goto(base + "/")
    await expect(alice.locator("#grants")).to_contain_text("deploy on prod-1")
    await shot(alice, "overview")
    await alice.click("#grants >> text=Release")
    await expect(alice.locator(".flash.ok")).to_contain_text("Released")
    await wait_for(lambda: check(state, "alice", "deploy") == 1, 30, "the host to remove it")
    await bob_ctx.close()
    await alice_ctx.close()
    _ = timedelta  # (durations are typed in the form as text)


def _subject(raw: bytes) -> str:
    return str(message_from_bytes(raw)["Subject"])
