"""E-mail over SMTP with STARTTLS: plain text plus HTML, one message per notice."""

from __future__ import annotations

import ssl
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

import aiosmtplib

from server.domain.notices import Notice

from .base import DeliveryFailed, Links
from .render import html_body, summary, text


class EmailReceiver:
    """Sends to fixed addresses through one SMTP server. STARTTLS is required unless
    `starttls=False` is configured explicitly (a relay on the same host); `tls_context` lets a
    private CA be trusted."""

    def __init__(
        self,
        name: str,
        *,
        host: str,
        port: int,
        sender: str,
        to: tuple[str, ...],
        username: str = "",
        password: str = "",
        starttls: bool = True,
        tls_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
    ) -> None:
        if not to:
            raise ValueError("an e-mail receiver needs at least one address to send to")
        self._name = name
        self._host = host
        self._port = port
        self._sender = sender
        self._to = to
        self._username = username
        self._password = password
        self._starttls = starttls
        self._tls_context = tls_context
        self._timeout = timeout

    @property
    def name(self) -> str:
        return self._name

    def message(self, notice: Notice, links: Links) -> EmailMessage:
        msg = EmailMessage()
        msg["Subject"] = f"[jitmesh] {summary(notice)}"[:200]
        msg["From"] = self._sender
        msg["To"] = ", ".join(self._to)
        msg["Date"] = format_datetime(notice.at)
        # The same Message-ID on every attempt: mail systems can drop a repeat by it.
        msg["Message-ID"] = make_msgid(idstring=notice.id, domain="jitmesh")
        msg["X-Jitmesh-Delivery"] = notice.id
        msg.set_content(text(notice, links))
        msg.add_alternative(html_body(notice, links), subtype="html")
        return msg

    async def deliver(self, notice: Notice, links: Links) -> None:
        try:
            await aiosmtplib.send(
                self.message(notice, links),
                hostname=self._host,
                port=self._port,
                username=self._username or None,
                password=self._password or None,
                start_tls=self._starttls,
                use_tls=False,
                tls_context=self._tls_context,
                timeout=self._timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            raise DeliveryFailed("recipients refused", retryable=False) from exc
        except aiosmtplib.SMTPResponseException as exc:
            # 4xx: try later; 5xx: the server will not take it.
            raise DeliveryFailed(f"SMTP {exc.code}", retryable=exc.code < 500) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise DeliveryFailed(f"cannot reach the SMTP server ({type(exc).__name__})") from None
