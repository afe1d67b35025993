"""The outbox end to end, in a real coordinator (gRPC on loopback, SQLite in a temporary
directory) with real receivers: a request reaches approvers by webhook, Slack and e-mail; Slack's
Approve click reviews as the mapped user; the requester hears the outcome; a receiver that is
down gets each notice later, once; a coordinator restart loses nothing and sends nothing twice."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from jitmesh.client import Client
from jitmesh.clock import Clock, FakeClock
from jitmesh.types import RequestState
from server.app import Coordinator, build
from server.config import CoordinatorConfig
from server.domain.errors import PermissionDenied
from server.domain.policy import DEV_POLICY
from server.domain.receivers import DeliveryState, Route
from server.notify.render import APPROVE
from server.notify.webhook import WebhookVerifier
from tests.notify.servers import HttpRecorder, Received, SmtpServer
from tests.notify.test_receivers import FakeSlack
from tests.server.helpers import ADMIN, TOKENS, USERS

SECRET = "whsec-outbox-test"
SIGNING = b"slack-signing-secret-e2e"


@asynccontextmanager
async def running(
    data: Path, clock: Clock, **settings: Any
) -> AsyncIterator[tuple[Coordinator, dict[str, Client]]]:
    """A coordinator running (sender and Slack endpoint included) with the test users and two
    agents enrolled; clients for each user."""
    config = CoordinatorConfig(
        data_dir=data, default_policy=DEV_POLICY, web_url="https://jit.example.com",
        **{"port": 0, **settings},
    )  # fmt: skip
    coordinator = await build(config, clock=clock)
    task = asyncio.create_task(coordinator.run())
    try:
        for name, groups in USERS.items():
            await coordinator.identity.ensure_user(name, groups, TOKENS[name])
        for agent, labels in {"web-1": {"env": "staging"}, "db-1": {"env": "prod"}}.items():
            if await coordinator.store.get_agent(agent) is None:
                join, _ = await coordinator.fleet.create_join_token(ADMIN, labels, None)
                await coordinator.fleet.enroll(join, agent, {})
        async with AsyncExitStack() as stack:
            clients = {
                name: await stack.enter_async_context(
                    await Client.connect(f"127.0.0.1:{coordinator.port}", token=TOKENS[name])
                )
                for name in USERS
            }
            yield coordinator, clients
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def verifying(verifier: WebhookVerifier) -> Any:
    def answer(item: Received) -> tuple[int, Any]:
        try:
            verifier.verify(item.headers, item.body, datetime.now(UTC))
        except ValueError as exc:
            return 401, {"error": str(exc)}
        return 200, {"ok": True}

    return answer


def kinds(received: list[Received]) -> list[str]:
    return [r.json()["kind"] for r in received if r.status == 200]


async def add_webhook(coordinator: Coordinator, url: str, **route: Any) -> None:
    assert coordinator.receivers is not None
    await coordinator.receivers.add(
        ADMIN, name="hook", kind="webhook", settings={"url": url}, secret=SECRET,
        route=Route(**route),
    )  # fmt: skip


async def file_prod_request(alice: Client) -> str:
    request, grant = await alice.create_request(
        agent="db-1", action="deploy", duration=timedelta(minutes=30), reason="release 2.4"
    )
    assert grant is None
    return request.id


async def test_request_reaches_approvers_by_webhook_slack_and_email_and_slack_approves(
    tmp_path: Path,
    recorder: HttpRecorder,
    smtp: SmtpServer,
    smtp_tls: ssl.SSLContext,
    tls_files: tuple[Path, Path, Path],
    http: httpx.AsyncClient,
) -> None:
    hook = HttpRecorder(asyncio.get_running_loop()).start()
    hook.answer = verifying(WebhookVerifier(SECRET.encode()))
    recorder.answer = lambda _: (200, {"ok": True, "ts": "1.1"})  # Slack's Web API and actions
    signing = tmp_path / "slack-signing"
    signing.write_bytes(SIGNING)
    clock = FakeClock(datetime.now(UTC))
    try:
        async with running(
            tmp_path / "c", clock, slack_signing_secret_file=signing,
            slack_response_hosts=("127.0.0.1",),
        ) as (coordinator, clients):  # fmt: skip
            receivers = coordinator.receivers
            assert receivers is not None
            await add_webhook(coordinator, hook.url + "/jitmesh")
            await receivers.add(
                ADMIN, name="slack", kind="slack",
                settings={"channel": "C0APPROVERS", "api_url": recorder.url, "users": "U0BOB=bob"},
                secret="xoxb-bot-token", route=Route(kinds=("request.created",)),
            )  # fmt: skip
            await receivers.add(
                ADMIN, name="mail", kind="email",
                settings={
                    "host": "127.0.0.1", "port": str(smtp.port), "sender": "jit@example.com",
                    "to": "sre@example.com", "ca_file": str(tls_files[2]),
                },
                secret="", route=Route(kinds=("request.created",), labels={"env": "prod"}),
            )  # fmt: skip
            request_id = await file_prod_request(clients["alice"])

            got = await hook.wait_for(lambda r: "request.created" in kinds(r))
            assert got[0].json()["link"] == f"https://jit.example.com/requests/{request_id}"
            [posted] = await recorder.wait_for(lambda r: len(r) == 1)
            assert posted.path == "/chat.postMessage"
            assert posted.headers["Authorization"] == "Bearer xoxb-bot-token"
            [mail] = await smtp.wait_for(1)
            assert mail.rcpt_tos == ["sre@example.com"]
            assert request_id.encode() in (mail.original_content or b"")

            # Bob clicks Approve in Slack: Slack signs the interaction and posts it.
            fake = FakeSlack(
                http,
                f"http://127.0.0.1:{coordinator.slack_port}/slack/interactions",
                recorder.url + "/actions/T1/B1",
            )
            message = posted.json()
            body = fake.click("U0BOB", APPROVE, request_id)
            payload = json.loads(httpx.QueryParams(body.decode())["payload"])
            payload["message"] = {"blocks": message["blocks"]}
            from urllib.parse import urlencode

            body = urlencode({"payload": json.dumps(payload)}).encode()
            assert (await fake.post(body, secret=SIGNING)).status_code == 200

            request = await clients["alice"].get_request(request_id)
            assert request.state is RequestState.APPROVED
            assert request.decided_by == "bob via slack"
            audit = await coordinator.store.list_audit(
                since=None, agent="", subject="", kind="request.approved", grant_id="",
                request_id=request_id, after_seq=0, limit=10,
            )  # fmt: skip
            assert [e.actor for e in audit] == ["bob via slack"]
            # Slack's message: buttons replaced with the outcome.
            update = (await recorder.wait_for(lambda r: len(r) == 2))[1]
            assert update.path == "/actions/T1/B1"
            assert update.json()["replace_original"] is True
            assert "Approved by bob via Slack" in update.json()["text"]
            # The requester's side hears the outcome (the webhook routes every event).
            await hook.wait_for(lambda r: "request.approved" in kinds(r))
            # The e-mail route takes only request.created: nothing more came.
            assert len(smtp.mailbox.messages) == 1
    finally:
        hook.stop()


async def test_slack_click_for_a_request_the_user_may_not_review_changes_nothing(
    tmp_path: Path, recorder: HttpRecorder, http: httpx.AsyncClient
) -> None:
    signing = tmp_path / "slack-signing"
    signing.write_bytes(SIGNING)
    clock = FakeClock(datetime.now(UTC))
    async with running(
        tmp_path / "c", clock, slack_signing_secret_file=signing,
        slack_response_hosts=("127.0.0.1",),
    ) as (coordinator, clients):  # fmt: skip
        assert coordinator.receivers is not None
        await coordinator.receivers.add(
            ADMIN, name="slack", kind="slack",
            settings={
                "channel": "C1", "api_url": recorder.url, "users": "U0DAVE=dave,U0ALICE=alice"
            },
            secret="xoxb-bot-token", route=Route(kinds=("request.created",)),
        )  # fmt: skip
        request_id = await file_prod_request(clients["alice"])
        fake = FakeSlack(
            http, f"http://127.0.0.1:{coordinator.slack_port}/slack/interactions",
            recorder.url + "/actions/1",
        )  # fmt: skip
        # Dave (developers) is not an approver; alice may not approve her own request.
        for user in ("U0DAVE", "U0ALICE"):
            response = await fake.post(fake.click(user, APPROVE, request_id), secret=SIGNING)
            assert response.status_code == 200
        answers = await recorder.wait_for(
            lambda r: len([x for x in r if x.path == "/actions/1"]) == 2
        )
        texts = [a.json()["text"] for a in answers if a.path == "/actions/1"]
        assert all(t.startswith("Not done:") for t in texts)
        request = await clients["alice"].get_request(request_id)
        assert request.state is RequestState.PENDING
        assert request.reviews == ()


async def test_a_receiver_down_for_a_while_gets_each_notice_later_once(
    tmp_path: Path, recorder: HttpRecorder
) -> None:
    recorder.answer = verifying(WebhookVerifier(SECRET.encode()))
    url = recorder.url
    recorder.stop()
    clock = FakeClock(datetime.now(UTC))
    async with running(tmp_path / "c", clock) as (coordinator, clients):
        assert coordinator.receivers is not None
        assert coordinator.sender is not None
        await add_webhook(coordinator, url, kinds=("request.created",))
        request_id = await file_prod_request(clients["alice"])
        # The first attempts fail while the receiver is down; each is recorded.
        sender = coordinator.sender
        async with asyncio.timeout(10):
            while sender.attempts < 1:
                await asyncio.sleep(0.01)
        log = await coordinator.receivers.log(ADMIN, request_id=request_id, receiver="", limit=10)
        assert [(a.ok, a.state) for a in log] == [(False, DeliveryState.PENDING)]
        assert "ConnectError" in log[0].detail
        recorder.start()
        # A little later (the retry's backoff, on the coordinator's clock) it is delivered.
        for _ in range(3):
            await clock.advance(timedelta(seconds=30))
        got = await recorder.wait_for(lambda r: len(r) >= 1)
        async with asyncio.timeout(10):
            while sender.attempts < 2:
                await asyncio.sleep(0.01)
        await clock.advance(timedelta(minutes=30))
        log = await coordinator.receivers.log(ADMIN, request_id=request_id, receiver="", limit=10)
        assert [(a.attempt, a.ok) for a in reversed(log)] == [(1, False), (2, True)]
        assert [a.state for a in log] == [DeliveryState.DELIVERED] * 2
    assert len(got) == 1
    assert got[0].status == 200


async def test_a_coordinator_restart_loses_no_notice_and_sends_none_twice(
    tmp_path: Path, recorder: HttpRecorder
) -> None:
    recorder.answer = verifying(WebhookVerifier(SECRET.encode()))
    url = recorder.url
    recorder.stop()
    clock = FakeClock(datetime.now(UTC))
    data = tmp_path / "c"
    async with running(data, clock) as (coordinator, clients):
        assert coordinator.sender is not None
        await add_webhook(coordinator, url, kinds=("request.created",))
        first = await file_prod_request(clients["alice"])
        second = await file_prod_request(clients["dave"])
        async with asyncio.timeout(10):
            while coordinator.sender.attempts < 2:
                await asyncio.sleep(0.01)
    # Stopped with both undelivered. The receiver comes back; so does the coordinator.
    recorder.start()
    async with running(data, clock) as (coordinator, _):
        # The retries come due on the coordinator's clock.
        await clock.advance(timedelta(minutes=1))
        got = await recorder.wait_for(lambda r: len(r) >= 2)
        assert coordinator.sender is not None
        async with asyncio.timeout(10):
            while coordinator.sender.attempts < 2:
                await asyncio.sleep(0.01)
        assert sorted(r.json()["request_id"] for r in got) == sorted([first, second])
    # Once more: nothing left to send, nothing sent again.
    async with running(data, clock) as (coordinator, _):
        assert coordinator.sender is not None
        async with httpx.AsyncClient() as http:
            assert await coordinator.sender.step(http) == 0
        assert coordinator.receivers is not None
        log = await coordinator.receivers.log(ADMIN, request_id="", receiver="hook", limit=10)
        assert sorted((a.ok, a.state) for a in log) == sorted(
            [(False, DeliveryState.DELIVERED)] * 2 + [(True, DeliveryState.DELIVERED)] * 2
        )
    assert len(recorder.received) == 2


async def test_receivers_are_for_admins_and_never_show_their_secret(
    tmp_path: Path, recorder: HttpRecorder
) -> None:
    clock = FakeClock(datetime.now(UTC))
    async with running(tmp_path / "c", clock) as (coordinator, _):
        receivers = coordinator.receivers
        assert receivers is not None
        await add_webhook(coordinator, recorder.url)
        from server.domain.models import Principal

        bob = Principal("bob", frozenset({"sre"}))
        with pytest.raises(PermissionDenied):
            await receivers.add(
                bob, name="x", kind="webhook", settings={"url": "https://x"}, secret="s",
                route=Route(),
            )  # fmt: skip
        [spec] = await receivers.receivers(ADMIN)
        assert SECRET not in spec.secret
        assert spec.secret.startswith("sealed:")
        raw = (tmp_path / "c" / "coordinator.db").read_bytes()
        assert SECRET.encode() not in raw
        audit = await coordinator.store.list_audit(
            since=None, agent="", subject="", kind="", grant_id="", request_id="",
            after_seq=0, limit=1000,
        )  # fmt: skip
        added = [e for e in audit if e.kind == "notify.receiver_added"]
        assert [e.actor for e in added] == ["admin"]
        assert SECRET not in json.dumps([e.details for e in audit])
        await receivers.remove(ADMIN, "hook")
        assert await receivers.receivers(ADMIN) == []


async def test_receivers_and_the_delivery_log_over_the_api(
    tmp_path: Path, recorder: HttpRecorder
) -> None:
    from jitmesh.errors import PermissionDeniedError
    from jitmesh.types import NotifyRoute

    recorder.answer = verifying(WebhookVerifier(SECRET.encode()))
    clock = FakeClock(datetime.now(UTC))
    async with running(tmp_path / "c", clock) as (coordinator, clients):
        admin = clients["admin"]
        added = await admin.add_receiver(
            "hook", "webhook", target=recorder.url, secret=SECRET,
            route=NotifyRoute(events=("request.created",), agent_labels={"env": "prod"}),
        )  # fmt: skip
        assert (added.name, added.kind, added.target) == ("hook", "webhook", recorder.url)
        assert added.secret_source == "stored"
        with pytest.raises(PermissionDeniedError):
            await clients["bob"].list_receivers()
        with pytest.raises(PermissionDeniedError):
            await clients["bob"].list_deliveries()
        [listed] = await admin.list_receivers()
        assert listed.route.agent_labels == {"env": "prod"}
        assert SECRET not in repr(listed)
        request_id = await file_prod_request(clients["alice"])
        # Staging is auto-approved and its agent has env=staging: not routed here.
        await clients["alice"].create_request(
            agent="web-1", action="deploy", duration=timedelta(minutes=5), reason=""
        )
        await recorder.wait_for(lambda r: len(r) == 1)
        assert coordinator.sender is not None
        async with asyncio.timeout(10):
            while coordinator.sender.attempts < 1:
                await asyncio.sleep(0.01)
        [delivery] = await admin.list_deliveries(receiver="hook")
        assert (delivery.state, delivery.attempts, delivery.request_id) == (
            "DELIVERED", 1, request_id,
        )  # fmt: skip
        await admin.remove_receiver("hook")
        assert await admin.list_receivers() == []


async def test_a_passed_stage_notifies_the_next_stages_approvers(
    tmp_path: Path, recorder: HttpRecorder
) -> None:
    from tests.server.test_workflow import STAGED

    recorder.answer = verifying(WebhookVerifier(SECRET.encode()))
    async with running(tmp_path / "c", FakeClock(datetime.now(UTC))) as (coordinator, clients):
        await clients["admin"].apply_policy(STAGED)
        await add_webhook(coordinator, recorder.url, kinds=("request.stage_approved",))
        request_id = await file_prod_request(clients["alice"])
        await clients["bob"].approve(request_id)
        await clients["carol"].approve(request_id)
        [notice] = await recorder.wait_for(lambda r: len(r) == 1)
        body = notice.json()
        assert (body["kind"], body["request_id"]) == ("request.stage_approved", request_id)
        assert (body["details"]["stage"], body["details"]["next_stage"]) == ("team", "security")


async def test_the_requester_is_told_the_outcome_by_email_and_the_team_still_is(
    tmp_path: Path, smtp: SmtpServer, tls_files: tuple[Path, Path, Path]
) -> None:
    clock = FakeClock(datetime.now(UTC))
    async with running(tmp_path / "c", clock) as (coordinator, clients):
        assert coordinator.receivers is not None
        await coordinator.receivers.add(
            ADMIN, name="mail", kind="email",
            settings={
                "host": "127.0.0.1", "port": str(smtp.port), "sender": "jit@example.com",
                "to": "sre@example.com", "requester_domain": "corp.example",
                "ca_file": str(tls_files[2]),
            },
            secret="", route=Route(kinds=("request.created", "request.approved"), requester=True),
        )  # fmt: skip
        request_id = await file_prod_request(clients["alice"])
        await smtp.wait_for(1)
        await clients["bob"].approve(request_id, reason="ok")
        mails = await smtp.wait_for(3)
        got = sorted(
            (m.rcpt_tos[0], (m.original_content or b"").split(b"Subject: ")[1].split(b"\r\n")[0])
            for m in mails
        )
        assert got == [
            ("alice@corp.example", b"[jitmesh] Request approved: alice deploy on db-1"),
            ("sre@example.com", b"[jitmesh] Access requested: alice deploy on db-1"),
            ("sre@example.com", b"[jitmesh] Request approved: alice deploy on db-1"),
        ]
        # Each is its own delivery in the log, under the receiver's name.
        assert coordinator.sender is not None
        async with asyncio.timeout(10):
            while coordinator.sender.attempts < 3:
                await asyncio.sleep(0.01)
        deliveries = await coordinator.receivers.deliveries(
            ADMIN, receiver="mail", states=(), limit=10, before=0
        )
        assert sorted((d.kind, d.receiver, d.state) for d in deliveries) == [
            ("request.approved", "mail", DeliveryState.DELIVERED),
            ("request.approved", "mail:requester", DeliveryState.DELIVERED),
            ("request.created", "mail", DeliveryState.DELIVERED),
        ]
        await coordinator.receivers.remove(ADMIN, "mail")
    assert len(smtp.mailbox.messages) == 3
