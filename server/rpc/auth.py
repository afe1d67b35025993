"""Credentials from call metadata. Identity comes only from here, never from a message field."""

from __future__ import annotations

from typing import Any

import grpc

from server.ca import user_of
from server.domain import errors
from server.domain.models import Principal, Scope


def bearer(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
    raise errors.Unauthenticated("missing bearer token (authorization metadata)")


class Authenticator:
    """Who is calling, and what their credential lets them do.

    Token scopes are enforced here and nowhere else: `operator` (which every call uses) refuses
    a scoped token, and `on_behalf` is the one door a scope opens. A new scope is a new method
    here, never a check scattered through handlers."""

    def __init__(self, identity: Any) -> None:
        self._identity = identity

    async def operator(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        """The caller acting as themselves: from an operator client certificate
        (`jitmesh://user/NAME`, verified by TLS against the internal CA on the mTLS port), else
        from the bearer token. A scoped (delegated) token is refused: it acts for nobody."""
        principal = await self._credential(context)
        if principal.scopes:
            raise errors.PermissionDenied(
                "this token is scoped ("
                + ", ".join(sorted(principal.scopes))
                + ") and cannot make this call"
            )
        return principal

    async def on_behalf(
        self, context: grpc.aio.ServicerContext[Any, Any], user: str, scope: Scope
    ) -> Principal:
        """The user `user` as relayed by the caller, who must hold a token with `scope`
        (certificates and unscoped tokens never act for someone else, admins' included). The
        result is that user with their own groups and `via` naming the caller."""
        delegate = await self._credential(context)
        if scope not in delegate.scopes:
            raise errors.PermissionDenied(
                f"acting on behalf of another user needs a token with scope {scope.value}"
            )
        acting: Principal = await self._identity.acting_for(delegate, user)
        return acting

    async def _credential(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        pem = peer_certificate(context)
        user = user_of(pem) if pem is not None else None
        if user is not None:
            # Looked up on every call: a disabled user or a revoked serial is refused at once.
            by_cert: Principal = await self._identity.authenticate_user(*user)
            return by_cert
        principal: Principal = await self._identity.authenticate(bearer(context))
        return principal


def peer_certificate(context: grpc.aio.ServicerContext[Any, Any]) -> bytes | None:
    """The client certificate TLS verified against the internal CA, if the call came with one.

    A grpc.aio interceptor cannot see it: handlers read it here, from the auth context."""
    values = list(context.auth_context().get("x509_pem_cert") or ())
    return bytes(values[0]) if values else None


def cert_binding(agent: str, serial: int) -> str:
    """The agent credential that stands for one issued certificate. It is derived from public
    data, so it is only ever accepted from a verified certificate, never as a bearer value."""
    return f"{CERT_PREFIX}{agent}:{serial:x}"


CERT_PREFIX = "x509:"
