"""Receivers against real servers: a local HTTP server checks webhook signatures, a fake Slack
(a local HTTP server for Slack's side) gets Block Kit messages and signs its interaction posts
exactly as Slack does, and aiosmtpd takes e-mail over STARTTLS."""

from __future__ import annotations

import json
import ssl
import time
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import Message
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from jitmesh.clock import FakeClock
from jitmesh.types import ReviewDecision
from server.domain.errors import InvalidArgument
from server.domain.notices import Notice, NoticeKind, notice_for
from server.domain.receivers import Route, split_target, targets, validate
from server.notify.base import DeliveryFailed, Links
from server.notify.http import INTERACTIONS_PATH, interactions_app, listen, serve
from server.notify.mail import EmailReceiver
from server.notify.render import APPROVE, DENY
from server.notify.retry import RetryPolicy, attempt
from server.notify.slack import SlackInteractions, SlackReceiver, slack_signature
from server.notify.webhook import WebhookReceiver, WebhookVerifier, sign
from tests.notify.servers import HttpRecorder, Received, SmtpServer

SECRET = b"whsec-test-secret"
SIGNING = b"slack-signing-secret"
LINKS = Links("https://jit.example.com")


def notice(kind: NoticeKind = NoticeKind.REQUEST_CREATED, **details: str) -> Notice:
    return Notice(
        id="evt-0001",
        kind=kind,
        at=datetime(2026, 12, 6, 15, 0, tzinfo=UTC),
        actor="alice",
        subject="alice",
        agent="db-1",
        request_id="req-42",
        details={"action": "deploy", "reason": "release <v2> & more", **details},
    )


def real_clock() -> FakeClock:
    # Receivers compare with the wall clock: the sender's clock must say now.
    return FakeClock(datetime.now(UTC))


# Webhooks.


def verifying(verifier: WebhookVerifier) -> Any:
    def answer(item: Received) -> tuple[int, Any]:
        try:
            verifier.verify(item.headers, item.body, datetime.now(UTC))
        except ValueError as exc:
            return 401, {"error": str(exc)}
        return 200, {"ok": True}

    return answer


async def test_webhook_is_signed_and_verified_by_a_real_server(
    recorder: HttpRecorder, http: httpx.AsyncClient
) -> None:
    recorder.answer = verifying(WebhookVerifier(SECRET))
    receiver = WebhookReceiver("hook", recorder.url + "/in", SECRET, http, real_clock())
    await receiver.deliver(notice(), LINKS)
    [got] = recorder.received
    assert got.status == 200
    body = got.json()
    assert body["kind"] == "request.created"
    assert body["id"] == "evt-0001" == got.headers["X-Jitmesh-Delivery"]
    assert body["link"] == "https://jit.example.com/requests/req-42"
    assert (body["subject"], body["agent"], body["action"]) == ("alice", "db-1", "deploy")


async def test_a_replayed_webhook_is_refused(
    recorder: HttpRecorder, http: httpx.AsyncClient
) -> None:
    recorder.answer = verifying(WebhookVerifier(SECRET))
    receiver = WebhookReceiver("hook", recorder.url, SECRET, http, real_clock())
    await receiver.deliver(notice(), LINKS)
    first = recorder.received[0]
    # The captured request, sent again byte for byte.
    again = await http.post(recorder.url, content=first.body, headers=first.headers)
    assert again.status_code == 401
    assert "replay" in again.json()["error"]
    # An old capture re-signed? Not without the secret; an old capture as it was: too old.
    old = int(time.time()) - 600
    stale = {**first.headers, "X-Jitmesh-Timestamp": str(old)}
    stale["X-Jitmesh-Signature"] = sign(SECRET, old, first.body)
    stale["X-Jitmesh-Delivery"] = "evt-other"
    refused = await http.post(recorder.url, content=first.body, headers=stale)
    assert refused.status_code == 401
    assert "window" in refused.json()["error"]


async def test_a_webhook_with_the_wrong_secret_is_refused_and_not_retried(
    recorder: HttpRecorder, http: httpx.AsyncClient
) -> None:
    recorder.answer = verifying(WebhookVerifier(SECRET))
    receiver = WebhookReceiver("hook", recorder.url, b"another secret", http, real_clock())
    result = await attempt(receiver, notice(), LINKS)
    assert not result.ok
    assert not result.retryable
    assert result.detail == "HTTP 401"


async def test_a_receiver_that_is_down_is_retried_later(
    recorder: HttpRecorder, http: httpx.AsyncClient
) -> None:
    url = recorder.url
    recorder.stop()
    receiver = WebhookReceiver("hook", url, SECRET, http, real_clock())
    result = await attempt(receiver, notice(), LINKS)
    assert (result.ok, result.retryable) == (False, True)
    assert "ConnectError" in result.detail
    recorder.answer = lambda _: (503, None)
    recorder.start()
    result = await attempt(receiver, notice(), LINKS)
    assert (result.ok, result.retryable, result.detail) == (False, True, "HTTP 503")


def test_the_documented_ten_line_check_accepts_a_real_signature() -> None:
    # docs/notifications.md: the receiver's side in ten lines, copied here verbatim.
    import hashlib
    import hmac

    def verify(secret: bytes, headers: dict[str, str], body: bytes, window: int = 300) -> bool:
        ts = headers["X-Jitmesh-Timestamp"]
        if abs(time.time() - int(ts)) > window:
            return False
        mac = hmac.new(secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        return hmac.compare_digest("v1=" + mac, headers["X-Jitmesh-Signature"])

    now = int(time.time())
    body = b'{"kind":"request.created"}'
    headers = {"X-Jitmesh-Timestamp": str(now), "X-Jitmesh-Signature": sign(SECRET, now, body)}
    assert verify(SECRET, headers, body)
    assert not verify(SECRET, headers, body + b" ")
    assert not verify(b"wrong", headers, body)


# Slack messages.


async def test_slack_webhook_message_has_block_kit_buttons(
    recorder: HttpRecorder, http: httpx.AsyncClient
) -> None:
    receiver = SlackReceiver("slack", http, webhook_url=recorder.url + "/services/T/B/X")
    await receiver.deliver(notice(), LINKS)
    message = recorder.received[0].json()
    assert message["text"].startswith("Access requested: alice deploy on db-1")
    [actions] = [b for b in message["blocks"] if b["type"] == "actions"]
    ids = {e["action_id"]: e["value"] for e in actions["elements"]}
    assert ids == {APPROVE: "req-42", DENY: "req-42"}
    text = json.dumps(message["blocks"])
    assert "release &lt;v2&gt; &amp; more" in text  # mrkdwn-escaped
    assert "https://jit.example.com/requests/req-42" in text


async def test_slack_outcomes_have_no_buttons(
    recorder: HttpRecorder, http: httpx.AsyncClient
) -> None:
    receiver = SlackReceiver("slack", http, webhook_url=recorder.url)
    await receiver.deliver(notice(NoticeKind.REQUEST_APPROVED), LINKS)
    assert all(b["type"] != "actions" for b in recorder.received[0].json()["blocks"])


async def test_slack_web_api_uses_the_bot_token_and_reports_refusals(
    recorder: HttpRecorder, http: httpx.AsyncClient
) -> None:
    def api(item: Received) -> tuple[int, Any]:
        if item.headers.get("Authorization") != "Bearer xoxb-good":
            return 200, {"ok": False, "error": "invalid_auth"}
        return 200, {"ok": True, "ts": "1.2"}

    recorder.answer = api
    good = SlackReceiver("s", http, token="xoxb-good", channel="C1", api_url=recorder.url)
    await good.deliver(notice(), LINKS)
    assert recorder.received[0].path == "/chat.postMessage"
    assert recorder.received[0].json()["channel"] == "C1"
    bad = SlackReceiver("s", http, token="xoxb-bad", channel="C1", api_url=recorder.url)
    with pytest.raises(DeliveryFailed) as refused:
        await bad.deliver(notice(), LINKS)
    assert not refused.value.retryable
    assert "xoxb" not in str(refused.value)


# Slack interactions.


class FakeSlack:
    """Slack's side of a click: builds the interaction payload and signs the POST as Slack
    does (v0, HMAC-SHA256 over "v0:timestamp:body" with the app's signing secret)."""

    def __init__(self, http: httpx.AsyncClient, endpoint: str, response_url: str) -> None:
        self.http = http
        self.endpoint = endpoint
        self.response_url = response_url

    def click(self, user: str, action_id: str, request_id: str) -> bytes:
        payload = {
            "type": "block_actions",
            "user": {"id": user, "username": user.lower()},
            "actions": [{"action_id": action_id, "value": request_id, "type": "button"}],
            "response_url": self.response_url,
            "message": {
                "blocks": [
                    {"type": "section", "text": {"type": "mrkdwn", "text": "Access requested"}},
                    {"type": "actions", "elements": []},
                ]
            },
        }
        return urlencode({"payload": json.dumps(payload)}).encode()

    async def post(
        self, body: bytes, *, secret: bytes = SIGNING, timestamp: int | None = None
    ) -> httpx.Response:
        ts = str(int(time.time()) if timestamp is None else timestamp)
        return await self.post_signed(body, ts, slack_signature(secret, ts, body))

    async def post_signed(self, body: bytes, ts: str, signature: str) -> httpx.Response:
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Slack-Request-Timestamp": ts,
            "X-Slack-Signature": signature,
        }
        return await self.http.post(self.endpoint, content=body, headers=headers)


@pytest.fixture
async def slack_endpoint(recorder: HttpRecorder, http: httpx.AsyncClient) -> Any:
    """The interaction endpoint served over real HTTP, with a review that records its calls
    (the coordinator's review is tested end to end in test_outbox_e2e)."""
    import asyncio

    reviews: list[tuple[str, str, ReviewDecision]] = []

    async def review(user: str, request_id: str, decision: ReviewDecision) -> str:
        if request_id == "req-forbidden":
            raise PermissionError("reviewing this request needs a member of sre")
        reviews.append((user, request_id, decision))
        return "Approved" if decision is ReviewDecision.APPROVE else "Denied"

    async def users(slack_user: str) -> str | None:
        return {"U0BOB": "bob"}.get(slack_user)

    slack = SlackInteractions(
        SIGNING, users, review, http, real_clock(), response_hosts=("127.0.0.1",)
    )
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    task = asyncio.create_task(serve(interactions_app(slack), sock))
    try:
        fake = FakeSlack(
            http, f"http://127.0.0.1:{port}{INTERACTIONS_PATH}", recorder.url + "/actions/1"
        )
        yield fake, reviews
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_slack_approve_click_reviews_as_the_mapped_user_and_updates_the_message(
    slack_endpoint: Any, recorder: HttpRecorder
) -> None:
    fake, reviews = slack_endpoint
    response = await fake.post(fake.click("U0BOB", APPROVE, "req-42"))
    assert response.status_code == 200
    assert reviews == [("bob", "req-42", ReviewDecision.APPROVE)]
    [update] = await recorder.wait_for(lambda r: len(r) == 1)
    message = update.json()
    assert message["replace_original"] is True
    assert "Approved by bob via Slack" in message["text"]
    assert [b["type"] for b in message["blocks"]] == ["section", "section"]  # buttons gone


async def test_slack_deny_click(slack_endpoint: Any) -> None:
    fake, reviews = slack_endpoint
    assert (await fake.post(fake.click("U0BOB", DENY, "req-42"))).status_code == 200
    assert reviews == [("bob", "req-42", ReviewDecision.DENY)]


async def test_forged_and_replayed_slack_signatures_are_refused(slack_endpoint: Any) -> None:
    fake, reviews = slack_endpoint
    body = fake.click("U0BOB", APPROVE, "req-42")
    assert (await fake.post(body, secret=b"not the signing secret")).status_code == 401
    ts = str(int(time.time()))
    assert (await fake.post_signed(body, ts, "v0=" + "0" * 64)).status_code == 401
    # Tampered body under a genuine signature.
    signature = slack_signature(SIGNING, ts, body)
    other = fake.click("U0BOB", APPROVE, "req-43")
    assert (await fake.post_signed(other, ts, signature)).status_code == 401
    # Genuine but old (a capture replayed later), then genuine and taken, then replayed.
    assert (await fake.post(body, timestamp=int(time.time()) - 600)).status_code == 401
    assert reviews == []
    assert (await fake.post_signed(body, ts, signature)).status_code == 200
    assert (await fake.post_signed(body, ts, signature)).status_code == 401
    assert reviews == [("bob", "req-42", ReviewDecision.APPROVE)]


async def test_unmapped_slack_users_and_refusals_get_an_ephemeral_answer(
    slack_endpoint: Any, recorder: HttpRecorder
) -> None:
    fake, reviews = slack_endpoint
    await fake.post(fake.click("U0EVE", APPROVE, "req-42"))
    await fake.post(fake.click("U0BOB", APPROVE, "req-forbidden"))
    answers = await recorder.wait_for(lambda r: len(r) == 2)
    assert reviews == []
    texts = sorted(a.json()["text"] for a in answers)
    assert "not mapped" in texts[1]
    assert texts[0].startswith("Not done: reviewing this request needs a member of sre")
    assert all(a.json()["replace_original"] is False for a in answers)


# E-mail.


async def test_email_over_starttls_has_text_and_html(
    smtp: SmtpServer, smtp_tls: ssl.SSLContext
) -> None:
    receiver = EmailReceiver(
        "mail", host="127.0.0.1", port=smtp.port, sender="jitmesh@example.com",
        to=("approvers@example.com",), tls_context=smtp_tls,
    )  # fmt: skip
    await receiver.deliver(notice(), LINKS)
    [envelope] = await smtp.wait_for(1)
    assert envelope.rcpt_tos == ["approvers@example.com"]
    assert envelope.content is not None
    mail = message_from_bytes(envelope.content if isinstance(envelope.content, bytes) else b"")
    assert mail["Subject"] == "[jitmesh] Access requested: alice deploy on db-1"
    assert mail["X-Jitmesh-Delivery"] == "evt-0001"
    parts: dict[str, str] = {}
    for part in mail.walk():
        if isinstance(part, Message) and not part.is_multipart():
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            parts[part.get_content_type()] = payload.decode()
    assert "Open: https://jit.example.com/requests/req-42" in parts["text/plain"]
    assert "release &lt;v2&gt; &amp; more" in parts["text/html"]
    assert "href='https://jit.example.com/requests/req-42'" in parts["text/html"]


async def test_email_refuses_a_server_it_cannot_trust(smtp: SmtpServer) -> None:
    receiver = EmailReceiver(
        "mail", host="127.0.0.1", port=smtp.port, sender="jitmesh@example.com",
        to=("approvers@example.com",),
    )  # fmt: skip
    result = await attempt(receiver, notice(), LINKS)
    assert not result.ok
    assert smtp.mailbox.messages == []


# Retry timing and which events notify.


def test_retry_delays_double_with_jitter_up_to_the_cap_then_give_up() -> None:
    policy = RetryPolicy(first=timedelta(seconds=2), cap=timedelta(minutes=10), attempts=5)
    assert policy.delay(1, 0.0) == timedelta(seconds=1)
    assert policy.delay(1, 1.0) == timedelta(seconds=2)
    assert policy.delay(3, 0.5) == timedelta(seconds=6)
    assert policy.delay(20, 1.0) == timedelta(minutes=10)
    now = datetime(2026, 12, 6, tzinfo=UTC)
    assert policy.next_at(4, now, 0.0) == now + timedelta(seconds=8)
    assert policy.next_at(5, now, 0.0) is None


def test_only_notifiable_audit_kinds_make_notices() -> None:
    from jitmesh.types import AuditEvent

    def event(kind: str) -> AuditEvent:
        at = datetime(2026, 12, 6, tzinfo=UTC)
        return AuditEvent(1, "evt-1", at, "alice", kind, "alice", "db-1", "req-1", "", {}, "", "")

    made = notice_for(event("request.created"))
    assert made is not None
    assert made.kind is NoticeKind.REQUEST_CREATED
    assert notice_for(event("grant.expired")) is None
    assert notice_for(event("agent.connected")) is None


def test_requesters_get_their_outcomes_beside_what_the_route_sends_its_own_recipients() -> None:
    everything = Route(requester=True)
    only_new = Route(kinds=("request.created",), requester=True)
    created, approved = notice(), notice(NoticeKind.REQUEST_APPROVED)
    # E-mail with `to` and `requester_domain`: the team gets what the route matches and the
    # requester their outcomes, each as a delivery of its own.
    assert targets("mail", everything, approved, {}, "", own=True, personal=True) == [
        "mail", "mail:requester",
    ]  # fmt: skip
    assert targets("mail", everything, created, {}, "", own=True, personal=True) == ["mail"]
    assert targets("mail", only_new, approved, {}, "", own=True, personal=True) == [
        "mail:requester"
    ]
    # Only `requester_domain`: nothing for anyone but requesters.
    assert targets("mail", everything, created, {}, "", own=False, personal=True) == []
    # A webhook cannot address a person: it takes the requester's outcomes itself, once.
    assert targets("hook", only_new, approved, {}, "", own=True, personal=False) == ["hook"]
    assert targets("hook", Route(kinds=("request.created",)), approved, {}, "", own=True,
                   personal=False) == []  # fmt: skip
    assert split_target("mail:requester") == ("mail", True)
    assert split_target("mail") == ("mail", False)


def test_an_email_receiver_without_addresses_or_requesters_is_refused() -> None:
    settings = {"host": "smtp.example.com", "sender": "jit@example.com"}
    with pytest.raises(InvalidArgument, match="needs `to`"):
        validate("mail", "email", settings, Route())
    with pytest.raises(InvalidArgument, match="requesters on"):
        validate("mail", "email", {**settings, "requester_domain": "corp.example"}, Route())
    validate("mail", "email", {**settings, "requester_domain": "corp.example"},
             Route(requester=True))  # fmt: skip
