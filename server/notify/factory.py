"""Receivers built from their stored definitions."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from jitmesh.clock import Clock
from server.domain.notices import Notice
from server.domain.receivers import ReceiverKind, ReceiverSpec

from .base import Links, Receiver
from .mail import EmailReceiver
from .secrets import Sealer
from .slack import SLACK_API, SlackReceiver
from .webhook import WebhookReceiver


def users_map(text: str) -> dict[str, str]:
    """`U0BOB=bob,U0CAROL=carol`: Slack user ids to jitmesh user names."""
    pairs = (item.split("=", 1) for item in text.split(",") if "=" in item)
    return {k.strip(): v.strip() for k, v in pairs if k.strip() and v.strip()}


@dataclass(frozen=True, slots=True)
class Built:
    """A receiver as the sender uses it: `own` sends to the receiver's own recipients (None
    when it has none: e-mail with only `requester_domain`), `personal` to the requester
    themself (None when the receiver cannot address a person, or its route does not ask)."""

    own: Receiver | None
    personal: Receiver | None


def build(spec: ReceiverSpec, sealer: Sealer, http: httpx.AsyncClient, clock: Clock) -> Built:
    s = spec.settings
    secret = sealer.open_secret(spec.secret)
    wants = spec.route.requester
    if spec.kind is ReceiverKind.WEBHOOK:
        return Built(WebhookReceiver(spec.name, s["url"], secret.encode(), http, clock), None)
    if spec.kind is ReceiverKind.SLACK:
        if secret.startswith("https://"):
            return Built(SlackReceiver(spec.name, http, webhook_url=secret), None)
        api = s.get("api_url", SLACK_API)
        base = SlackReceiver(spec.name, http, token=secret, channel=s["channel"], api_url=api)
        users = {v: k for k, v in users_map(s.get("users", "")).items()}
        personal = _SlackDirect(spec.name, http, secret, api, users) if wants and users else None
        return Built(base, personal)
    context = None
    if s.get("ca_file"):
        context = ssl.create_default_context(cafile=s["ca_file"])
    mail = EmailReceiver(
        spec.name,
        host=s["host"],
        port=int(s.get("port", "587")),
        sender=s["sender"],
        to=tuple(a.strip() for a in s.get("to", "").split(",") if a.strip()),
        username=s.get("username", ""),
        password=secret,
        starttls=s.get("starttls", "true").lower() != "false",
        tls_context=context,
    ) if s.get("to") else None  # fmt: skip
    domain = s.get("requester_domain", "")
    direct = _MailDirect(spec.name, s, secret, context, domain) if domain and wants else None
    if mail is None and direct is None:
        raise ValueError("an e-mail receiver needs `to`, or `requester_domain` with requesters")
    return Built(mail, direct)


class _SlackDirect:
    """A direct message to the requester's mapped Slack user (Web API only)."""

    def __init__(
        self, name: str, http: httpx.AsyncClient, token: str, api: str, users: dict[str, str]
    ) -> None:
        self._name = name
        self._http = http
        self._token = token
        self._api = api
        self._users = users

    @property
    def name(self) -> str:
        return self._name

    async def deliver(self, notice: Notice, links: Links) -> None:
        slack_user = self._users.get(notice.subject)
        if slack_user is None:
            return  # nobody to write to: not a failure to retry
        direct = SlackReceiver(
            self._name, self._http, token=self._token, channel=slack_user, api_url=self._api,
            buttons=False,
        )  # fmt: skip
        await direct.deliver(notice, links)


class _MailDirect:
    def __init__(
        self,
        name: str,
        s: Mapping[str, str],
        password: str,
        context: ssl.SSLContext | None,
        domain: str,
    ) -> None:
        self._name = name
        self._settings = s
        self._password = password
        self._context = context
        self._domain = domain

    @property
    def name(self) -> str:
        return self._name

    async def deliver(self, notice: Notice, links: Links) -> None:
        s = self._settings
        mail = EmailReceiver(
            self._name,
            host=s["host"],
            port=int(s.get("port", "587")),
            sender=s["sender"],
            to=(f"{notice.subject}@{self._domain}",),
            username=s.get("username", ""),
            password=self._password,
            starttls=s.get("starttls", "true").lower() != "false",
            tls_context=self._context,
        )
        await mail.deliver(notice, links)
