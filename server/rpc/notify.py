"""The Notify service: receivers and routes, and the delivery log. Admins only."""

from __future__ import annotations

from typing import Any

import grpc

from jitmesh.v1 import notify_pb2, notify_pb2_grpc
from server.domain import errors
from server.domain.receivers import (
    DeliveryRecord,
    DeliveryState,
    ReceiverKind,
    ReceiverService,
    ReceiverSpec,
    Route,
)

from . import convert as c
from .auth import Authenticator
from .errors import mapped

Ctx = grpc.aio.ServicerContext[Any, Any]

_KINDS = {
    notify_pb2.RECEIVER_KIND_WEBHOOK: ReceiverKind.WEBHOOK,
    notify_pb2.RECEIVER_KIND_SLACK: ReceiverKind.SLACK,
    notify_pb2.RECEIVER_KIND_EMAIL: ReceiverKind.EMAIL,
}
_KIND_PB = {v: k for k, v in _KINDS.items()}
# PENDING with attempts behind it is FAILING on the wire (retrying with backoff).
_STATES = {
    notify_pb2.DELIVERY_STATE_PENDING: [DeliveryState.PENDING],
    notify_pb2.DELIVERY_STATE_FAILING: [DeliveryState.PENDING],
    notify_pb2.DELIVERY_STATE_DELIVERED: [DeliveryState.DELIVERED],
    notify_pb2.DELIVERY_STATE_ABANDONED: [DeliveryState.GAVE_UP],
}
MAX_PAGE = 1000


def _settings(kind: ReceiverKind, receiver: notify_pb2.Receiver) -> dict[str, str]:
    settings = dict(receiver.settings)
    if receiver.target:
        key = {ReceiverKind.WEBHOOK: "url", ReceiverKind.SLACK: "channel"}.get(kind, "to")
        settings[key] = receiver.target
    return settings


def receiver_pb(spec: ReceiverSpec) -> notify_pb2.Receiver:
    settings = dict(spec.settings)
    key = {ReceiverKind.WEBHOOK: "url", ReceiverKind.SLACK: "channel"}.get(spec.kind, "to")
    target = settings.pop(key, "")
    secret = spec.secret
    source = secret if secret.startswith("file:") else ("stored" if secret else "")
    return notify_pb2.Receiver(
        id=spec.name,
        name=spec.name,
        kind=_KIND_PB[spec.kind],
        target=target,
        route=notify_pb2.Route(
            events=list(spec.route.kinds),
            agent_labels=dict(spec.route.labels),
            actions=list(spec.route.actions),
            rules=list(spec.route.rules),
            requesters=spec.route.requester,
        ),
        secret_source=source,
        created_at=c.ts(spec.created_at),
        created_by=spec.created_by,
        settings=settings,
    )


def delivery_pb(d: DeliveryRecord) -> notify_pb2.Delivery:
    state = {
        DeliveryState.DELIVERED: notify_pb2.DELIVERY_STATE_DELIVERED,
        DeliveryState.GAVE_UP: notify_pb2.DELIVERY_STATE_ABANDONED,
    }.get(
        d.state,
        notify_pb2.DELIVERY_STATE_FAILING if d.attempts else notify_pb2.DELIVERY_STATE_PENDING,
    )
    return notify_pb2.Delivery(
        id=f"{d.event_seq}:{d.receiver}",
        receiver_id=d.receiver,
        audit_seq=d.event_seq,
        event_kind=d.kind,
        state=state,
        attempts=d.attempts,
        last_attempt_at=c.ts(d.last_attempt_at),
        next_attempt_at=c.ts(d.next_attempt_at),
        last_error=d.last_error,
        request_id=d.request_id,
        grant_id=d.grant_id,
    )


class NotifyServicer(notify_pb2_grpc.NotifyServicer):
    def __init__(self, auth: Authenticator, receivers: ReceiverService) -> None:
        self._auth = auth
        self._receivers = receivers

    @mapped
    async def AddReceiver(
        self, request: notify_pb2.AddReceiverRequest, context: Ctx
    ) -> notify_pb2.Receiver:
        principal = await self._auth.operator(context)
        r = request.receiver
        kind = _KINDS.get(r.kind)
        if kind is None:
            raise errors.InvalidArgument("receiver kind must be webhook, slack or email")
        if request.secret and request.secret_file:
            raise errors.InvalidArgument("give the secret or a secret file, not both")
        secret = f"file:{request.secret_file}" if request.secret_file else request.secret
        spec = await self._receivers.add(
            principal,
            name=r.name or r.id,
            kind=kind.value,
            settings=_settings(kind, r),
            secret=secret,
            route=Route(
                kinds=tuple(r.route.events),
                labels=dict(r.route.agent_labels),
                actions=tuple(r.route.actions),
                rules=tuple(r.route.rules),
                requester=r.route.requesters,
            ),
        )
        return receiver_pb(spec)

    @mapped
    async def ListReceivers(
        self, request: notify_pb2.ListReceiversRequest, context: Ctx
    ) -> notify_pb2.ListReceiversResponse:
        principal = await self._auth.operator(context)
        specs = await self._receivers.receivers(principal)
        return notify_pb2.ListReceiversResponse(receivers=[receiver_pb(s) for s in specs])

    @mapped
    async def RemoveReceiver(
        self, request: notify_pb2.RemoveReceiverRequest, context: Ctx
    ) -> notify_pb2.RemoveReceiverResponse:
        principal = await self._auth.operator(context)
        await self._receivers.remove(principal, request.id)
        return notify_pb2.RemoveReceiverResponse()

    @mapped
    async def ListDeliveries(
        self, request: notify_pb2.ListDeliveriesRequest, context: Ctx
    ) -> notify_pb2.ListDeliveriesResponse:
        principal = await self._auth.operator(context)
        states = sorted({s for v in request.states for s in _STATES.get(v, [])})
        before = 0
        if request.page_token:
            if not request.page_token.isdigit():
                raise errors.InvalidArgument("page_token is not one this service gave out")
            before = int(request.page_token)
        size = min(request.page_size or 100, MAX_PAGE)
        found = await self._receivers.deliveries(
            principal, receiver=request.receiver_id, states=states, limit=size + 1, before=before
        )
        page = found[:size]
        wanted = set(request.states)
        out = [delivery_pb(d) for d in page]
        if wanted:
            out = [d for d in out if d.state in wanted]
        token = str(page[-1].event_seq) if len(found) > size and page else ""
        return notify_pb2.ListDeliveriesResponse(deliveries=out, next_page_token=token)
