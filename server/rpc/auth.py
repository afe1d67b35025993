"""Credentials from call metadata. Identity comes only from here, never from a message field."""

from __future__ import annotations

from typing import Any

import grpc

from server.domain import errors
from server.domain.models import Principal


def bearer(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
    raise errors.Unauthenticated("missing bearer token (authorization metadata)")


class Authenticator:
    def __init__(self, identity: Any) -> None:
        self._identity = identity

    async def operator(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        principal: Principal = await self._identity.authenticate(bearer(context))
        return principal
