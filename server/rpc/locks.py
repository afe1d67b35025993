"""The Locks service: authorize, translate, call the domain, translate back."""

from __future__ import annotations

from jitmesh import convert as shared
from jitmesh.v1 import locks_pb2, locks_pb2_grpc
from server.domain.locks import LockService

from .auth import Authenticator
from .errors import mapped
from .services import Ctx, _duration


class LocksServicer(locks_pb2_grpc.LocksServicer):
    def __init__(self, auth: Authenticator, locks: LockService) -> None:
        self._auth = auth
        self._locks = locks

    @mapped
    async def CreateLock(
        self, request: locks_pb2.CreateLockRequest, context: Ctx
    ) -> locks_pb2.CreateLockResponse:
        principal = await self._auth.operator(context)
        ttl = _duration(request.ttl, "ttl") if request.HasField("ttl") else None
        lock, revoked, denied = await self._locks.create(
            principal, shared.lock_target(request.target), request.reason, ttl
        )
        return locks_pb2.CreateLockResponse(
            lock=shared.lock_to_proto(lock), grants_revoked=revoked, requests_denied=denied
        )

    @mapped
    async def ListLocks(
        self, request: locks_pb2.ListLocksRequest, context: Ctx
    ) -> locks_pb2.ListLocksResponse:
        principal = await self._auth.operator(context)
        locks = await self._locks.list(principal, include_ended=request.include_ended)
        return locks_pb2.ListLocksResponse(locks=[shared.lock_to_proto(x) for x in locks])

    @mapped
    async def LiftLock(self, request: locks_pb2.LiftLockRequest, context: Ctx) -> locks_pb2.Lock:
        principal = await self._auth.operator(context)
        return shared.lock_to_proto(await self._locks.lift(principal, request.id, request.reason))
