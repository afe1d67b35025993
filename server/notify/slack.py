"""Slack: Block Kit messages with Approve and Deny, and the endpoint their clicks come to.

Messages go through an incoming webhook or the Web API (`chat.postMessage` with a bot token).
A click arrives as Slack's interaction POST (form field `payload`), signed by Slack:
`X-Slack-Signature: v0=<hex HMAC-SHA256(signing secret, "v0:" + timestamp + ":" + body)>` with
`X-Slack-Request-Timestamp`. The endpoint refuses a bad signature, a timestamp outside the
window and a payload it has already taken, maps the Slack user to a jitmesh user (a configured
table: nobody unmapped acts), reviews as that user through the delegated review (the
coordinator checks the user's own eligibility; the audit says `bob via slack`), and replaces
the message with the outcome through the payload's `response_url`."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import httpx

from jitmesh.clock import Clock
from jitmesh.types import ReviewDecision
from server.domain.notices import Notice

from .base import DeliveryFailed, Links, http_failure, transport_failure
from .render import APPROVE, DENY, slack_blocks, summary

log = logging.getLogger(__name__)

REPLAY_WINDOW = timedelta(minutes=5)
SLACK_API = "https://slack.com/api"


class SlackReceiver:
    """Posts notices to one channel: `webhook_url` (incoming webhook) or `token` + `channel`
    (Web API, `api_url` replaceable for tests)."""

    def __init__(
        self,
        name: str,
        http: httpx.AsyncClient,
        *,
        webhook_url: str = "",
        token: str = "",
        channel: str = "",
        api_url: str = SLACK_API,
        buttons: bool = True,
    ) -> None:
        if not webhook_url and not (token and channel):
            raise ValueError("a Slack receiver needs a webhook URL, or a bot token and a channel")
        self._name = name
        self._http = http
        self._webhook_url = webhook_url
        self._token = token
        self._channel = channel
        self._api_url = api_url.rstrip("/")
        self._buttons = buttons

    @property
    def name(self) -> str:
        return self._name

    async def deliver(self, notice: Notice, links: Links) -> None:
        message: dict[str, Any] = {
            "text": summary(notice),
            "blocks": slack_blocks(notice, links, buttons=self._buttons),
        }
        try:
            if self._webhook_url:
                response = await self._http.post(self._webhook_url, json=message)
            else:
                response = await self._http.post(
                    f"{self._api_url}/chat.postMessage",
                    json={"channel": self._channel, **message},
                    headers={"Authorization": f"Bearer {self._token}"},
                )
        except httpx.HTTPError as exc:
            raise transport_failure(exc) from None
        if not response.is_success:
            raise http_failure(response)
        if not self._webhook_url:
            # The Web API answers 200 with {"ok": false, "error": ...} when it refuses.
            answer = _json(response)
            if not answer.get("ok"):
                error = str(answer.get("error", "unknown"))[:64]
                retryable = error in ("ratelimited", "internal_error", "service_unavailable")
                raise DeliveryFailed(f"Slack refused: {error}", retryable=retryable)


def slack_signature(signing_secret: bytes, timestamp: str, body: bytes) -> str:
    base = b"v0:" + timestamp.encode() + b":" + body
    return "v0=" + hmac.new(signing_secret, base, hashlib.sha256).hexdigest()


class SignatureRefused(Exception):
    """An interaction that did not come from Slack, or came before (a replay)."""


@dataclass(frozen=True, slots=True)
class Click:
    """One Approve or Deny click, as Slack reported it."""

    slack_user: str
    decision: ReviewDecision
    request_id: str
    response_url: str
    # The message's blocks as Slack sent them back, so the outcome replaces only the buttons.
    blocks: tuple[dict[str, Any], ...] = ()


# Reviews the request as `user` through Slack (the delegated review): the outcome's one-line
# description, or an exception whose message says why not.
Review = Callable[[str, str, ReviewDecision], Awaitable[str]]


class SlackInteractions:
    """The interaction endpoint's logic, independent of the HTTP server that serves it."""

    def __init__(
        self,
        signing_secret: bytes,
        users: Callable[[str], Awaitable[str | None]],
        review: Review,
        http: httpx.AsyncClient,
        clock: Clock,
        window: timedelta = REPLAY_WINDOW,
        response_hosts: tuple[str, ...] = ("hooks.slack.com",),
    ) -> None:
        self._secret = signing_secret
        self._users = users
        self._review = review
        self._http = http
        self._clock = clock
        self._window = window
        self._seen: OrderedDict[str, None] = OrderedDict()
        # response_url comes inside the (signed) payload; posting only to Slack's own hosts
        # keeps a leaked signing secret from turning us into a request forwarder.
        self._response_hosts = response_hosts

    def verify(self, headers: Mapping[str, str], body: bytes, now: datetime) -> None:
        lower = {k.lower(): v for k, v in headers.items()}
        timestamp = lower.get("x-slack-request-timestamp", "")
        signature = lower.get("x-slack-signature", "")
        if not timestamp.isdigit() or not signature:
            raise SignatureRefused("missing Slack signature headers")
        if not hmac.compare_digest(slack_signature(self._secret, timestamp, body), signature):
            raise SignatureRefused("bad Slack signature")
        if abs(now.timestamp() - int(timestamp)) > self._window.total_seconds():
            raise SignatureRefused("Slack timestamp outside the replay window")
        # Within the window, the same signed body is taken once (a captured click replayed).
        if signature in self._seen:
            raise SignatureRefused("Slack interaction already taken (replay)")
        self._seen[signature] = None
        while len(self._seen) > 10_000:
            self._seen.popitem(last=False)

    def parse(self, body: bytes) -> Click | None:
        """The click in a verified body, or None for interactions that are not ours."""
        fields = parse_qs(body.decode("utf-8", "replace"))
        try:
            payload = json.loads(fields["payload"][0])
            user = str(payload["user"]["id"])
            action = payload["actions"][0]
            response_url = str(payload.get("response_url", ""))
        except (KeyError, IndexError, TypeError, ValueError):
            return None
        decisions = {APPROVE: ReviewDecision.APPROVE, DENY: ReviewDecision.DENY}
        decision = decisions.get(str(action.get("action_id", "")))
        if payload.get("type") != "block_actions" or decision is None:
            return None
        message = payload.get("message")
        blocks = message.get("blocks", []) if isinstance(message, dict) else []
        kept = tuple(b for b in blocks if isinstance(b, dict) and b.get("type") != "actions")
        return Click(user, decision, str(action.get("value", "")), response_url, kept)

    async def handle(self, headers: Mapping[str, str], body: bytes) -> int:
        """Verify, act, answer: the HTTP status for Slack (the outcome goes to response_url)."""
        try:
            self.verify(headers, body, self._clock.now())
        except SignatureRefused as exc:
            log.warning("slack interaction refused: %s", exc)
            return 401
        click = self.parse(body)
        if click is None:
            return 200
        user = await self._users(click.slack_user)
        if user is None:
            await self._respond(
                click, f"Your Slack account ({click.slack_user}) is not mapped to a jitmesh user.",
                replace=False,
            )  # fmt: skip
            return 200
        try:
            outcome = await self._review(user, click.request_id, click.decision)
        except Exception as exc:  # the coordinator's refusal, shown to the one who clicked
            await self._respond(click, f"Not done: {exc}", replace=False)
            return 200
        await self._respond(click, f"{outcome} by {user} via Slack", replace=True)
        return 200

    async def _respond(self, click: Click, text: str, *, replace: bool) -> None:
        host = httpx.URL(click.response_url).host if click.response_url else ""
        if host not in self._response_hosts:
            log.warning("slack response_url host not allowed host=%s", host)
            return
        outcome = {"type": "section", "text": {"type": "mrkdwn", "text": text}}
        message: dict[str, Any] = {
            "text": text,
            "blocks": [*click.blocks, outcome] if replace else [outcome],
        }
        if replace:
            message["replace_original"] = True
        else:
            message["response_type"] = "ephemeral"
            message["replace_original"] = False
        try:
            await self._http.post(click.response_url, json=message)
        except httpx.HTTPError as exc:
            log.warning("slack response_url failed: %s", type(exc).__name__)


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        value = response.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
