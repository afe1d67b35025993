"""Real local servers for the notification tests: an HTTP server that records what it gets (a
webhook receiver, or Slack's side of a conversation), and an SMTP server (aiosmtpd) with
STARTTLS. Each runs on 127.0.0.1, port 0, and can be stopped and started again on the same port
(a receiver that is down for a while)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    def json(self) -> Any:
        return json.loads(self.body)


# Decides the answer to one request: (status, JSON body or None).
Answer = Callable[[Received], tuple[int, Any]]


@dataclass
class HttpRecorder:
    """A threaded stdlib HTTP server: every POST is recorded and answered by `answer`."""

    loop: asyncio.AbstractEventLoop
    answer: Answer = field(default=lambda _: (200, {"ok": True}))
    port: int = 0
    received: list[Received] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def start(self) -> HttpRecorder:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                item = Received(self.path, dict(self.headers.items()), body, 0)
                status, reply = recorder.answer(item)
                item.status = status
                data = json.dumps(reply).encode() if reply is not None else b""
                # Recorded before the reply goes out: once the sender has its answer, a test
                # can read `received` without waiting (waiters are woken on the loop).
                recorder.received.append(item)
                recorder.loop.call_soon_threadsafe(recorder._notify)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(5)
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _notify(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        self.loop.create_task(notify())

    async def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout: float = 20.0
    ) -> list[Received]:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self.received))
        return self.received


class _Mailbox:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.messages: list[Envelope] = []
        self.changed = asyncio.Condition()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        # Runs in the controller's own thread and loop: hand over to the test's loop.
        self.loop.call_soon_threadsafe(self._record, envelope)
        return "250 OK"

    def _record(self, envelope: Envelope) -> None:
        self.messages.append(envelope)

        async def notify() -> None:
            async with self.changed:
                self.changed.notify_all()

        self.loop.create_task(notify())


class SmtpServer:
    """aiosmtpd on 127.0.0.1 that requires STARTTLS (with a certificate made for the test)
    before it takes mail."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cert: Path, key: Path) -> None:
        self.mailbox = _Mailbox(loop)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        # The controller checks it is up by connecting to its port, so it needs a real one.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._controller = Controller(
            self.mailbox,
            hostname="127.0.0.1",
            port=self.port,
            tls_context=context,
            require_starttls=True,
        )

    def start(self) -> SmtpServer:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[Envelope]:
        async with asyncio.timeout(timeout), self.mailbox.changed:
            await self.mailbox.changed.wait_for(lambda: len(self.mailbox.messages) >= count)
        return self.mailbox.messages
