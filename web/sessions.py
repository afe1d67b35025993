"""Server-side sessions: the browser holds only a random session id (Secure, HttpOnly,
SameSite=Strict cookie); the person's jitmesh token stays here, in memory, and ends with the
session (sign-out, idle timeout, the token's expiry, or a restart of jitmesh-web)."""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field

from jitmesh.client import Client


@dataclass
class Session:
    id: str
    token: str
    user: str
    groups: tuple[str, ...]
    csrf: str
    expires_at: float  # monotonic
    client: Client | None = None
    # Messages shown once on the next page ("Request filed", "Not allowed: ...").
    flashes: list[tuple[str, str]] = field(default_factory=list)

    async def drop_client(self) -> None:
        """Close the session's channel to the coordinator; the next call opens a new one."""
        client, self.client = self.client, None
        if client is not None:
            await client.close()

    def csrf_ok(self, value: str) -> bool:
        return bool(value) and hmac.compare_digest(self.csrf, value)


@dataclass
class PendingSignIn:
    """An OpenID Connect sign-in in flight, by its `state`: the PKCE verifier (which never
    leaves this process) and where to go afterwards. The browser's binding to it is the signed
    cookie (web/signin.py)."""

    state: str
    nonce: str
    verifier: str
    next_path: str
    expires_at: float


# Sign-ins in flight kept at most (each is one unauthenticated POST away): the oldest go first.
MAX_PENDING = 10_000


class Sessions:
    def __init__(self, idle: float = 8 * 3600) -> None:
        self._sessions: dict[str, Session] = {}
        self._pending: dict[str, PendingSignIn] = {}
        self._idle = idle

    def create(self, token: str, user: str, groups: tuple[str, ...], lifetime: float) -> Session:
        session = Session(
            id=secrets.token_urlsafe(32),
            token=token,
            user=user,
            groups=groups,
            csrf=secrets.token_urlsafe(32),
            expires_at=time.monotonic() + min(lifetime, self._idle),
        )
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if time.monotonic() >= session.expires_at:
            self._sessions.pop(session_id, None)
            return None
        return session

    async def end(self, session_id: str | None) -> None:
        session = self._sessions.pop(session_id or "", None)
        if session is not None:
            await session.drop_client()

    async def close(self) -> None:
        for session_id in list(self._sessions):
            await self.end(session_id)

    def begin_sign_in(
        self, state: str, nonce: str, verifier: str, next_path: str, lifetime: float
    ) -> PendingSignIn:
        now = time.monotonic()
        self._pending = {k: p for k, p in self._pending.items() if p.expires_at > now}
        while len(self._pending) >= MAX_PENDING:
            self._pending.pop(next(iter(self._pending)))
        pending = PendingSignIn(state, nonce, verifier, next_path, now + lifetime)
        self._pending[state] = pending
        return pending

    def finish_sign_in(self, state: str) -> PendingSignIn | None:
        """The sign-in `state` started, once (a second callback with it finds nothing)."""
        pending = self._pending.pop(state, None)
        if pending is None or pending.expires_at <= time.monotonic():
            return None
        return pending
