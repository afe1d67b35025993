"""The outbox across a SIGKILL of the coordinator (issue 13): a real coordinator process with
real receivers on loopback (a webhook server checking each signature, an SMTP server requiring
STARTTLS). Notices are written while the webhook receiver is down (mail is up); the coordinator
is killed with SIGKILL while the webhook's notices wait in the outbox; after the restart each
notice reaches each receiver exactly once: the undelivered ones are sent, the delivered ones
are not sent again."""

from __future__ import annotations

import asyncio
import email
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from jitmesh import Client
from jitmesh.types import NotifyRoute
from server.notify.webhook import WebhookVerifier
from tests.e2e import procs
from tests.e2e.procs import free_port, read_env, wait_for, wait_healthy
from tests.notify.servers import HttpRecorder, SmtpServer
from tests.notify.test_outbox import SECRET, verifying

LOCKS = 12  # notices written before the kill (each a lock.created event)


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    """Poll a condition read over the API until it holds; fail naming `what` after `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def message_id(raw: bytes) -> str:
    found = email.message_from_bytes(raw)["Message-ID"]
    assert found
    return str(found)


@pytest.mark.subprocess
async def test_sigkill_with_notices_in_the_outbox_sends_each_exactly_once(
    tmp_path: Path, smtp: SmtpServer, tls_files: tuple[Path, Path, Path]
) -> None:
    hook = HttpRecorder(asyncio.get_running_loop()).start()
    hook.answer = verifying(WebhookVerifier(SECRET.encode()))
    hook.stop()  # down (connection refused) until after the kill; its port is kept
    port = free_port()
    address = f"127.0.0.1:{port}"
    data = tmp_path / "coordinator"
    coordinator = procs.coordinator(data, port)
    coordinator.start()
    try:
        await wait_healthy(address)
        # Dev mode writes dev.env (atomically) before the port serves (376115f): the wait is
        # only a guard, it holds at once.
        env_file = data / "dev.env"
        await wait_for(
            lambda: env_file.exists() and "JITMESH_TOKEN_ADMIN=" in env_file.read_text(),
            30,
            "dev.env",
        )
        env = read_env(env_file)
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ADMIN"]) as admin:
            route = NotifyRoute(events=("lock.created",))
            await admin.add_receiver(
                "hook", "webhook", target=hook.url + "/jitmesh", route=route, secret=SECRET
            )
            await admin.add_receiver(
                "mail", "email", route=route,
                settings={
                    "host": "127.0.0.1", "port": str(smtp.port), "sender": "jit@example.com",
                    "to": "sec@example.com", "ca_file": str(tls_files[2]),
                },
            )  # fmt: skip
            for n in range(LOCKS):
                await admin.create_lock(subject=f"user-{n}", reason="incident 42")

            async def mail_sent_and_hook_tried() -> bool:
                found = await admin.list_deliveries(limit=100)
                mail = [d for d in found if d.receiver == "mail" and d.state == "DELIVERED"]
                tried = [d for d in found if d.receiver == "hook" and d.attempts >= 1]
                return len(mail) == LOCKS and len(tried) == LOCKS

            await until("mail delivered, every webhook notice tried", mail_sent_and_hook_tried)
            listed = await admin.list_deliveries(receiver="hook")
            waiting = [d for d in listed if d.state != "DELIVERED"]
            assert len(waiting) == LOCKS
            assert all("Connect" in d.last_error for d in waiting)
        assert len(smtp.mailbox.messages) == LOCKS

        # SIGKILL: no shutdown code runs. The webhook receiver comes back, then the coordinator.
        coordinator.kill()
        hook.start()
        coordinator.start()
        await wait_healthy(address)
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ADMIN"]) as admin:
            await hook.wait_for(lambda r: len(r) >= LOCKS, timeout=60)
            # One more notice after the restart, as a barrier: once it has reached both
            # receivers, anything the restart was going to send again has been sent.
            await admin.create_lock(subject="after-restart", reason="barrier")
            await hook.wait_for(lambda r: len(r) >= LOCKS + 1, timeout=60)
            await smtp.wait_for(LOCKS + 1, timeout=60)

            async def all_delivered() -> bool:
                found = await admin.list_deliveries(limit=100)
                return len(found) == 2 * (LOCKS + 1) and all(d.state == "DELIVERED" for d in found)

            await until("every delivery recorded as delivered", all_delivered)
    finally:
        coordinator.stop()
        hook.stop()

    # Exactly once per receiver: every notice, no repeat (by the notice id each carries).
    hooks = Counter(r.json()["id"] for r in hook.received)
    assert all(r.status == 200 for r in hook.received)  # every signature checked out
    assert len(hooks) == LOCKS + 1
    assert set(hooks.values()) == {1}
    mails = Counter(message_id(m.original_content or b"") for m in smtp.mailbox.messages)
    assert len(mails) == LOCKS + 1
    assert set(mails.values()) == {1}
