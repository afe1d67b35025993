"""OpenID Connect ID tokens, verified: issuer, audience, signature (the issuer's JWKS, cached
and refreshed when a new key id appears), expiry, issue time and nonce. joserfc does the JOSE
work; this module only fetches keys and says which claims must hold."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from joserfc import errors as jose_errors
from joserfc import jwt
from joserfc.jwk import KeySet

from jitmesh.clock import Clock

# Asymmetric algorithms only: never "none", never an HMAC keyed with something public.
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
LEEWAY = 60  # seconds of clock difference tolerated on exp, iat and nbf
MAX_TOKEN = 16 * 1024


_KEY_ERRORS = (
    jose_errors.MissingKeyError,
    jose_errors.InvalidKeyIdError,
    jose_errors.BadSignatureError,
)


class IdTokenRejected(Exception):
    """The ID token is not one to trust; the message says which check failed (never the token)."""


@dataclass(frozen=True, slots=True)
class OidcSettings:
    issuer: str
    client_id: str
    scopes: tuple[str, ...] = ("openid", "profile", "email")


class OidcVerifier:
    def __init__(
        self,
        settings: OidcSettings,
        http: httpx.AsyncClient,
        clock: Clock,
        *,
        jwks_ttl: timedelta = timedelta(minutes=10),
        min_refresh: timedelta = timedelta(seconds=30),
    ) -> None:
        self.settings = settings
        self._http = http
        self._clock = clock
        self._jwks_ttl = jwks_ttl
        self._min_refresh = min_refresh
        self._keys: KeySet | None = None
        self._fetched_at: datetime | None = None
        self._jwks_uri = ""
        self._lock = asyncio.Lock()

    async def verify(self, id_token: str, nonce: str) -> dict[str, Any]:
        """The token's claims, once every check passed; else IdTokenRejected."""
        if not id_token or len(id_token) > MAX_TOKEN or id_token.count(".") != 2:
            raise IdTokenRejected("not an ID token (a compact JWS)")
        if not nonce:
            raise IdTokenRejected("a nonce is required")
        keys = await self._keyset(refresh=False)
        try:
            token = jwt.decode(id_token, keys, algorithms=ALGORITHMS)
        except _KEY_ERRORS:
            # Perhaps the issuer rotated its keys: fetch them again (at most every 30 s).
            keys = await self._keyset(refresh=True)
            try:
                token = jwt.decode(id_token, keys, algorithms=ALGORITHMS)
            except _KEY_ERRORS as exc:
                raise IdTokenRejected(
                    f"bad signature: no key of the issuer verifies it ({exc.error})"
                ) from None
            except jose_errors.JoseError as exc:
                raise IdTokenRejected(f"cannot decode the ID token ({exc.error})") from None
        except jose_errors.JoseError as exc:
            raise IdTokenRejected(f"cannot decode the ID token ({exc.error})") from None
        now = int(self._clock.now().timestamp())
        registry = jwt.JWTClaimsRegistry(
            now=now,
            leeway=LEEWAY,
            iss={"essential": True, "value": self.settings.issuer},
            aud={"essential": True, "value": self.settings.client_id},
            sub={"essential": True},
            exp={"essential": True},
            iat={"essential": True},
            nonce={"essential": True, "value": nonce},
        )
        try:
            registry.validate(token.claims)
        except jose_errors.ExpiredTokenError:
            raise IdTokenRejected("the ID token has expired") from None
        except jose_errors.JoseError as exc:
            raise IdTokenRejected(f"claim check failed ({exc.error}: {exc.description})") from None
        aud = token.claims.get("aud")
        if (
            isinstance(aud, list)
            and len(aud) > 1
            and token.claims.get("azp") != self.settings.client_id
        ):
            raise IdTokenRejected("the ID token was issued to another client (azp)")
        return dict(token.claims)

    async def _keyset(self, *, refresh: bool) -> KeySet:
        async with self._lock:
            now = self._clock.now()
            fresh = self._fetched_at is not None and now - self._fetched_at < self._jwks_ttl
            recent = self._fetched_at is not None and now - self._fetched_at < self._min_refresh
            if self._keys is not None and ((fresh and not refresh) or (refresh and recent)):
                return self._keys
            try:
                if not self._jwks_uri:
                    self._jwks_uri = await self._discover()
                response = await self._http.get(self._jwks_uri)
                response.raise_for_status()
                self._keys = KeySet.import_key_set(response.json())
            except (httpx.HTTPError, ValueError, jose_errors.JoseError) as exc:
                if self._keys is not None:
                    return self._keys  # keep using the keys we have while the issuer is away
                raise IdTokenRejected(
                    f"cannot fetch the issuer's keys ({type(exc).__name__})"
                ) from None
            self._fetched_at = now
            return self._keys

    async def _discover(self) -> str:
        url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
        response = await self._http.get(url)
        response.raise_for_status()
        document = response.json()
        if document.get("issuer") != self.settings.issuer:
            raise ValueError("the discovery document names another issuer")
        return str(document["jwks_uri"])
