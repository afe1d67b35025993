"""Login CSRF protection for single sign-on (OpenID Connect, authorization code with PKCE).

Without it, an attacker could start a sign-in with their own account, stop before the last
redirect, and send a victim the callback address: the victim's browser would finish the
attacker's sign-in and work, unknowingly, as the attacker (filing requests the attacker can
read). So the `state` and `nonce` of each sign-in are bound to the browser that started it: they
travel in a cookie signed with this process's key (HMAC-SHA256), HttpOnly, SameSite=Lax (Lax, not
Strict: the identity provider's redirect back is a cross-site top-level navigation, and a Strict
cookie would not come with it), limited to the callback's path and ten minutes. The callback
finishes a sign-in only when the `state` in its address equals the one in that browser's valid
cookie, and the coordinator checks the ID token's nonce against the cookie's nonce.

The PKCE verifier never leaves this process (kept server-side by `state`, used once)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

COOKIE = "jm_oidc"
COOKIE_PATH = "/signin/callback"
LIFETIME = 600.0  # seconds a sign-in may take at the identity provider
_CONTEXT = b"jitmesh-web oidc binding v1\x00"


@dataclass(frozen=True, slots=True)
class Binding:
    """What the callback must see again, in the browser that started the sign-in."""

    state: str
    nonce: str
    expires_at: float  # UNIX time

    @staticmethod
    def new(now: float) -> Binding:
        return Binding(secrets.token_urlsafe(24), secrets.token_urlsafe(24), now + LIFETIME)

    def matches(self, state: str) -> bool:
        return bool(state) and hmac.compare_digest(self.state.encode(), state.encode())


def seal(key: bytes, binding: Binding) -> str:
    """The cookie's value: the binding and its MAC (not secret from the browser that holds it;
    only this process can make one)."""
    payload = _b64(
        json.dumps(
            {"s": binding.state, "n": binding.nonce, "e": int(binding.expires_at)},
            separators=(",", ":"),
        ).encode()
    )
    return f"{payload}.{_mac(key, payload)}"


def unseal(key: bytes, value: str | None, now: float) -> Binding | None:
    """The binding a cookie carries; None when it is missing, altered, made with another key,
    malformed or expired."""
    if not value or len(value) > 512 or value.count(".") != 1:
        return None
    payload, mac = value.split(".")
    if not hmac.compare_digest(_mac(key, payload).encode(), mac.encode()):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        binding = Binding(str(data["s"]), str(data["n"]), float(data["e"]))
    except (ValueError, KeyError, TypeError):
        return None
    if binding.expires_at <= now or not binding.state or not binding.nonce:
        return None
    return binding


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier and its S256 challenge."""
    verifier = secrets.token_urlsafe(48)
    challenge = _b64(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge


def _mac(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, _CONTEXT + payload.encode(), hashlib.sha256).digest())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
