"""What every receiver is: something that delivers one notice, or says why it could not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import httpx

from server.domain.notices import Notice


class DeliveryFailed(Exception):
    """A delivery did not happen. `retryable`: the sender tries again later (a receiver that is
    down, slow or busy); otherwise it gives up (a receiver that refuses the message as such).
    The message never holds a secret or an address with a secret in it (Slack webhook URLs)."""

    def __init__(self, detail: str, *, retryable: bool = True) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class Links:
    """Where people see a request: the web page's address (empty: no links)."""

    web_url: str = ""

    def request(self, request_id: str) -> str:
        if not self.web_url or not request_id:
            return ""
        return f"{self.web_url.rstrip('/')}/requests/{request_id}"


class Receiver(Protocol):
    @property
    def name(self) -> str: ...

    async def deliver(self, notice: Notice, links: Links) -> None:
        """Deliver one notice or raise DeliveryFailed."""


def http_failure(response: httpx.Response) -> DeliveryFailed:
    """A non-2xx answer: busy, timed out or failing servers are tried again; a receiver that
    refuses the message (other 4xx) would refuse it again, so the sender gives up."""
    code = response.status_code
    retryable = code >= 500 or code in (408, 425, 429)
    return DeliveryFailed(f"HTTP {code}", retryable=retryable)


def transport_failure(exc: httpx.HTTPError) -> DeliveryFailed:
    # The exception's text can carry the URL (with a Slack webhook's secret path): name only
    # its class.
    return DeliveryFailed(f"cannot reach the receiver ({type(exc).__name__})")
