"""Webhooks: a JSON POST signed with HMAC-SHA256 over the timestamp and the body.

Headers (docs/notifications.md shows a ten-line check):

    X-Jitmesh-Delivery:  the notice id (the same on every attempt: drop repeats by it)
    X-Jitmesh-Timestamp: Unix seconds when this attempt was sent
    X-Jitmesh-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>

A receiver refuses a timestamp outside its window (5 minutes) and a delivery id it has already
taken: a captured request cannot be replayed later, nor twice within the window."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime, timedelta

import httpx

from jitmesh.clock import Clock
from server.domain.notices import Notice

from .base import DeliveryFailed, Links, http_failure, transport_failure
from .render import json_body

DELIVERY = "X-Jitmesh-Delivery"
TIMESTAMP = "X-Jitmesh-Timestamp"
SIGNATURE = "X-Jitmesh-Signature"
REPLAY_WINDOW = timedelta(minutes=5)


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


class WebhookReceiver:
    def __init__(self, name: str, url: str, secret: bytes, http: httpx.AsyncClient, clock: Clock):
        self._name = name
        self._url = url
        self._secret = secret
        self._http = http
        self._clock = clock

    @property
    def name(self) -> str:
        return self._name

    async def deliver(self, notice: Notice, links: Links) -> None:
        body = json.dumps(json_body(notice, links), separators=(",", ":")).encode()
        timestamp = int(self._clock.now().timestamp())
        headers = {
            "Content-Type": "application/json",
            DELIVERY: notice.id,
            TIMESTAMP: str(timestamp),
            SIGNATURE: sign(self._secret, timestamp, body),
        }
        try:
            response = await self._http.post(self._url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise transport_failure(exc) from None
        if not response.is_success:
            raise http_failure(response)


class WebhookVerifier:
    """The receiving side, for Python receivers and our tests: checks the signature, the
    timestamp's window, and that a delivery id is taken once."""

    def __init__(self, secret: bytes, window: timedelta = REPLAY_WINDOW, remember: int = 10_000):
        self._secret = secret
        self._window = window
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remember = remember

    def verify(self, headers: Mapping[str, str], body: bytes, now: datetime) -> str:
        """The delivery id of a genuine, fresh, first delivery; else ValueError saying why."""
        lower = {k.lower(): v for k, v in headers.items()}
        try:
            timestamp = int(lower[TIMESTAMP.lower()])
            signature = lower[SIGNATURE.lower()]
            delivery = lower[DELIVERY.lower()]
        except (KeyError, ValueError):
            raise ValueError("missing or malformed signature headers") from None
        if not hmac.compare_digest(sign(self._secret, timestamp, body), signature):
            raise ValueError("bad signature")
        if abs(now.timestamp() - timestamp) > self._window.total_seconds():
            raise ValueError("timestamp outside the replay window")
        if delivery in self._seen:
            raise ValueError("delivery already taken (replay)")
        self._seen[delivery] = None
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        return delivery


__all__ = ["DeliveryFailed", "WebhookReceiver", "WebhookVerifier", "sign"]
