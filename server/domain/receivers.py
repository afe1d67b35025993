"""Receivers and routes: where notices go. Pure: the definitions, their validation, and the one
function that decides whether a notice goes to a receiver."""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Protocol

from jitmesh.clock import Clock

from .errors import Conflict, InvalidArgument, NotFound, PermissionDenied
from .models import AuditEntry, AuditKind, Principal
from .notices import FOR_REQUESTER, NOTIFIABLE, Notice, NoticeKind
from .ports import Store

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class ReceiverKind(enum.StrEnum):
    WEBHOOK = "webhook"
    SLACK = "slack"
    EMAIL = "email"


class DeliveryState(enum.StrEnum):
    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    GAVE_UP = "GAVE_UP"


# Settings each kind accepts (never secrets: those go in the secret, sealed or from a file).
SETTINGS: dict[ReceiverKind, frozenset[str]] = {
    ReceiverKind.WEBHOOK: frozenset({"url"}),
    ReceiverKind.SLACK: frozenset({"channel", "api_url", "users"}),
    ReceiverKind.EMAIL: frozenset(
        {"host", "port", "sender", "to", "username", "starttls", "ca_file", "requester_domain"}
    ),
}
REQUIRED: dict[ReceiverKind, frozenset[str]] = {
    ReceiverKind.WEBHOOK: frozenset({"url"}),
    ReceiverKind.SLACK: frozenset(),
    ReceiverKind.EMAIL: frozenset({"host", "sender"}),
}


@dataclass(frozen=True, slots=True)
class Route:
    """Which notices go to a receiver. Empty filters match everything; `labels` must all match
    the agent's labels. `requester`: outcomes are also sent to the requester themself (a
    receiver that can address a person: e-mail with `requester_domain`, Slack with `users`),
    besides what the filters send the receiver's own recipients (see `targets`)."""

    kinds: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    actions: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    requester: bool = False


@dataclass(frozen=True, slots=True)
class ReceiverSpec:
    """A receiver as stored. `secret` is what the store keeps: sealed, or `file:<path>`."""

    name: str
    kind: ReceiverKind
    settings: Mapping[str, str]
    secret: str
    route: Route
    created_at: datetime
    created_by: str


def as_read(spec: ReceiverSpec) -> ReceiverSpec:
    """A stored receiver as this release reads it. An e-mail receiver with `requester_domain`
    and no `to` wrote to each requester before routes had `requester` (it has no recipients of
    its own): read it with requesters on, as such a receiver must be added now, so that it goes
    on telling requesters their outcomes after an upgrade instead of failing every delivery."""
    if (
        spec.kind is ReceiverKind.EMAIL
        and spec.settings.get("requester_domain")
        and not spec.settings.get("to")
        and not spec.route.requester
    ):
        return replace(spec, route=replace(spec.route, requester=True))
    return spec


@dataclass(frozen=True, slots=True)
class Delivery:
    """One notice for one receiver, as the sender claims it."""

    event_seq: int
    receiver: str
    attempts: int
    notice: Notice


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One try, as `jitctl notify log` shows it."""

    event_seq: int
    event_id: str
    kind: str
    receiver: str
    attempt: int
    at: datetime
    ok: bool
    detail: str
    state: DeliveryState


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One notice for one receiver, as `jitctl notify log` lists it."""

    event_seq: int
    event_id: str
    kind: str
    receiver: str
    state: DeliveryState
    attempts: int
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    last_error: str
    request_id: str
    grant_id: str


def validate(
    name: str,
    kind: str,
    settings: Mapping[str, str],
    route: Route,
) -> ReceiverKind:
    if not NAME.match(name):
        raise InvalidArgument(
            "receiver name must be 1-63 lowercase letters, digits, '.', '_' or '-'"
        )
    try:
        known = ReceiverKind(kind)
    except ValueError:
        raise InvalidArgument("receiver kind must be webhook, slack or email") from None
    unknown = set(settings) - SETTINGS[known]
    if unknown:
        raise InvalidArgument(
            f"unknown {known.value} setting(s): {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(SETTINGS[known]))})"
        )
    missing = REQUIRED[known] - set(settings)
    if missing:
        raise InvalidArgument(f"a {known.value} receiver needs: {', '.join(sorted(missing))}")
    personal_only = settings.get("requester_domain") and route.requester
    if known is ReceiverKind.EMAIL and not settings.get("to") and not personal_only:
        raise InvalidArgument(
            "an email receiver needs `to` (addresses to send to), or `requester_domain` "
            "with requesters on (--requesters) to write to each requester"
        )
    url = settings.get("url", "")
    if url and not url.startswith(("https://", "http://")):
        raise InvalidArgument("url must start with https:// (or http:// on a private network)")
    bad = set(route.kinds) - NOTIFIABLE
    if bad:
        raise InvalidArgument(
            f"unknown event kind(s): {', '.join(sorted(bad))} "
            f"(known: {', '.join(sorted(NOTIFIABLE))})"
        )
    return known


def matches(route: Route, notice: Notice, agent_labels: Mapping[str, str], rule: str) -> bool:
    """Does this notice go to a receiver with this route?"""
    if route.kinds and notice.kind.value not in route.kinds:
        return False
    if route.actions and notice.action not in route.actions:
        return False
    if route.rules and rule not in route.rules:
        return False
    return all(agent_labels.get(k) == v for k, v in route.labels.items())


def to_requester(route: Route, notice: Notice) -> bool:
    """Is this notice (also) for the requester, through this receiver?"""
    return route.requester and notice.kind in FOR_REQUESTER and bool(notice.subject)


# A delivery to the requester through receiver R is kept under the name `R:requester`
# (receiver names never hold ':'), beside R's own: each is tried, retried and logged on its
# own, so a notice that goes to both is sent to each once, and one that failed for one is
# never sent again to the other.
REQUESTER_SUFFIX = ":requester"


def targets(
    spec_name: str,
    route: Route,
    notice: Notice,
    agent_labels: Mapping[str, str],
    rule: str,
    *,
    own: bool,
    personal: bool,
) -> list[str]:
    """The deliveries a notice makes through one receiver. `own`: the receiver has recipients
    of its own (a URL, a channel, fixed addresses), who get what the route matches.
    `personal`: it can also address the requester themself (e-mail with `requester_domain`,
    Slack through the Web API with `users`), who then gets their outcomes besides. A receiver
    that cannot address a person (a webhook) gets the requester's outcomes itself, once."""
    mine = own and matches(route, notice, agent_labels, rule)
    theirs = to_requester(route, notice)
    if not personal:
        return [spec_name] if mine or (own and theirs) else []
    return ([spec_name] if mine else []) + ([spec_name + REQUESTER_SUFFIX] if theirs else [])


def split_target(target: str) -> tuple[str, bool]:
    """(receiver name, for the requester) of a delivery's receiver column."""
    if target.endswith(REQUESTER_SUFFIX):
        return target[: -len(REQUESTER_SUFFIX)], True
    return target, False


__all__ = [
    "AttemptRecord",
    "Delivery",
    "DeliveryRecord",
    "DeliveryState",
    "NoticeKind",
    "ReceiverKind",
    "ReceiverService",
    "ReceiverSpec",
    "Route",
    "as_read",
    "matches",
    "split_target",
    "targets",
    "to_requester",
    "validate",
]


class ReceiverService:
    """Receivers managed by admins: every change audited in its own transaction; secrets go
    through `seal` before the store sees them and are never returned."""

    def __init__(
        self,
        store: Store,
        outbox: ReceiverReader,
        clock: Clock,
        seal: Callable[[str], str],
        changed: Callable[[], None],
    ) -> None:
        self._store = store
        self._outbox = outbox
        self._clock = clock
        self._seal = seal
        self._changed = changed

    async def add(
        self,
        principal: Principal,
        *,
        name: str,
        kind: str,
        settings: Mapping[str, str],
        secret: str,
        route: Route,
    ) -> ReceiverSpec:
        _admin(principal)
        known = validate(name, kind, settings, route)
        try:
            sealed = self._seal(secret)
        except Exception as exc:
            raise InvalidArgument(str(exc)) from None
        now = self._clock.now()
        spec = ReceiverSpec(name, known, dict(settings), sealed, route, now, principal.name)
        async with self._store.transaction() as tx:
            if not await tx.insert_receiver(spec):
                raise Conflict(f"receiver {name} exists; remove it first")
            await tx.audit(
                AuditEntry(
                    AuditKind.NOTIFY_RECEIVER_ADDED,
                    principal.name,
                    now,
                    details={
                        "receiver": name,
                        "kind": known.value,
                        "events": ",".join(route.kinds),
                        "requester": str(route.requester).lower(),
                    },
                )
            )
        self._changed()
        return spec

    async def remove(self, principal: Principal, name: str) -> None:
        _admin(principal)
        now = self._clock.now()
        async with self._store.transaction() as tx:
            if not await tx.delete_receiver(name):
                raise NotFound(f"no receiver {name}")
            await tx.audit(
                AuditEntry(
                    AuditKind.NOTIFY_RECEIVER_REMOVED,
                    principal.name,
                    now,
                    details={"receiver": name},
                )
            )
        self._changed()

    async def receivers(self, principal: Principal) -> list[ReceiverSpec]:
        _admin(principal)
        return await self._outbox.list_receivers()

    async def deliveries(
        self,
        principal: Principal,
        *,
        receiver: str,
        states: Sequence[DeliveryState],
        limit: int,
        before: int,
    ) -> list[DeliveryRecord]:
        _admin(principal)
        return await self._outbox.deliveries(
            receiver=receiver, states=states, limit=max(1, min(limit, 1000)), before=before
        )

    async def log(
        self, principal: Principal, *, request_id: str, receiver: str, limit: int
    ) -> list[AttemptRecord]:
        _admin(principal)
        return await self._outbox.log(
            request_id=request_id, receiver=receiver, limit=max(1, min(limit, 1000))
        )


class ReceiverReader(Protocol):
    async def list_receivers(self) -> list[ReceiverSpec]: ...
    async def log(self, *, request_id: str, receiver: str, limit: int) -> list[AttemptRecord]: ...
    async def deliveries(
        self, *, receiver: str, states: Sequence[DeliveryState], limit: int, before: int
    ) -> list[DeliveryRecord]: ...


def _admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise PermissionDenied("managing notification receivers is for admins")
