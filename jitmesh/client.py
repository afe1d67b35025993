"""The async client SDK for the jitmesh coordinator.

    async with await Client.connect("127.0.0.1:7443", token=token) as client:
        request, grant = await client.create_request(
            agent="web-1", action="deploy", duration=timedelta(minutes=15), reason="release 42"
        )

Every method returns `jitmesh.types` values (never protobuf messages) and raises only
`jitmesh.errors.JitmeshError` subclasses for failures reported by, or on the way to, the
coordinator. Input that cannot be valid is refused before it is sent, with
`InvalidArgumentError`, so callers handle one error tree.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import random
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from importlib import metadata
from os import PathLike
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

from jitmesh import convert as _convert
from jitmesh import errors, profiles, tls, types, validation
from jitmesh.clock import to_ms
from jitmesh.durations import format_duration
from jitmesh.v1 import (
    access_pb2,
    access_pb2_grpc,
    agentlink_pb2,
    agents_pb2,
    agents_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    breakglass_pb2,
    breakglass_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    locks_pb2,
    locks_pb2_grpc,
    mesh_pb2,
    mesh_pb2_grpc,
    notify_pb2,
    notify_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    types_pb2,
)

__all__ = ["Client"]


def _grant_settled(request: types.Request) -> bool:
    """Decided, and if approved, its grant applied on the host (or failed there)."""
    if request.state in (types.RequestState.PENDING, types.RequestState.SCHEDULED):
        return False
    if request.state is not types.RequestState.APPROVED:
        return True
    return request.grant_state not in (None, types.GrantState.PENDING_DELIVERY)


_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_T = TypeVar("_T")

# Page size asked for when following next_page_token. Servers cap it (AIP-158) if it is too big.
_PAGE_SIZE: Final = 100
# Back-off between re-subscriptions while waiting on a watch stream that ended.
_RESUBSCRIBE_MIN: Final = 0.05
_RESUBSCRIBE_MAX: Final = 2.0
_MAX_MESSAGE: Final = 300
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# How long calls refused with a retry hint (the agent is behind: docs/wire.md, "Pushback") are
# retried by default before the refusal is raised; each wait is the hint plus up to a half more.
PUSHBACK_WAIT: Final = 30.0


# ---------------------------------------------------------------------------------------------
# gRPC status to SDK error: the one place the mapping lives.

_STATUS_ERRORS: Final[Mapping[grpc.StatusCode, tuple[type[errors.JitmeshError], str]]] = {
    grpc.StatusCode.UNAVAILABLE: (errors.UnavailableError, "the coordinator is unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (errors.DeadlineExceededError, "the call ran out of time"),
    grpc.StatusCode.UNAUTHENTICATED: (
        errors.AuthenticationError,
        "the coordinator did not accept the credential",
    ),
    grpc.StatusCode.PERMISSION_DENIED: (errors.PermissionDeniedError, "permission denied"),
    grpc.StatusCode.INVALID_ARGUMENT: (errors.InvalidArgumentError, "invalid argument"),
    grpc.StatusCode.OUT_OF_RANGE: (errors.InvalidArgumentError, "value out of range"),
    grpc.StatusCode.NOT_FOUND: (errors.NotFoundError, "not found"),
    grpc.StatusCode.FAILED_PRECONDITION: (
        errors.ConflictError,
        "the object is not in a state that allows this",
    ),
    grpc.StatusCode.ABORTED: (errors.ConflictError, "the change lost a race; try again"),
    grpc.StatusCode.ALREADY_EXISTS: (errors.ConflictError, "already exists"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (errors.RateLimitedError, "too many calls; slow down"),
}


# A reason names a subclass of the code's class: the finer error, where the SDK has one.
_REASON_ERRORS: Final[Mapping[str, type[errors.JitmeshError]]] = {
    "POLICY_DENIED": errors.PolicyDeniedError,
    "LOCKED": errors.LockedError,
}
_REASON = re.compile(r"[A-Z][A-Z0-9_]{0,62}")
# The ErrorInfo domain of the coordinator's reasons (server/rpc/errors.py).
_DOMAIN: Final = "jitmesh.dev"


def error_from_status(
    code: grpc.StatusCode,
    details: str | None,
    *,
    target: str,
    timeout: float | None = None,
    secrets: Iterable[str] = (),
    trust: str = "",
    reason: str = "",
) -> errors.JitmeshError:
    """The SDK exception for a gRPC status, keeping the server's message on one line.

    `reason` is the ErrorInfo reason the answer carried: it picks the finer class where there
    is one (POLICY_DENIED, LOCKED) and is kept on the error. `secrets` (the bearer token) are
    cut out of the message should the other side echo them.
    """
    message = _one_line(details or "")
    for secret in secrets:
        if secret:
            message = message.replace(secret, "[redacted]")
    cls, fallback = _STATUS_ERRORS.get(code, (errors.InternalError, ""))
    finer = _REASON_ERRORS.get(reason)
    if finer is not None and issubclass(finer, cls):
        cls = finer
    if code is grpc.StatusCode.UNAVAILABLE and reason == "STORE_UNAVAILABLE":
        # The coordinator answered: its database did not (the message says what to do).
        message = f"the coordinator at {target} could not reach its database: {message}"
    elif code is grpc.StatusCode.UNAVAILABLE:
        message = f"cannot reach the coordinator at {target}: {_transport_hint(message, trust)}"
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
        within = f" within {timeout:g}s" if timeout is not None else ""
        message = f"the coordinator at {target} did not answer{within}"
    elif cls is errors.InternalError:
        message = f"the coordinator failed ({code.name}): {message or 'no details'}"
    else:
        message = message or fallback
    return cls(message, code=code.name, reason=reason)


def rich_status(call: Any) -> status_pb2.Status | None:
    """The google.rpc.Status a failed call carried (grpcio-status reads the standard trailer),
    or None: without one, or when it does not parse or contradicts the call's own status (the
    other side is not trusted to send well-formed details)."""
    try:
        status: status_pb2.Status | None = rpc_status.from_call(call)
    except Exception:
        return None
    return status


def error_reason(status: status_pb2.Status | None) -> str:
    """The coordinator's ErrorInfo reason in `status`, "" without one."""
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if (
            detail.Is(info.DESCRIPTOR)
            and detail.Unpack(info)
            and info.domain == _DOMAIN
            and _REASON.fullmatch(info.reason)
        ):
            return str(info.reason)
    return ""


def retry_hint(status: status_pb2.Status | None) -> tuple[float, str] | None:
    """(seconds, agent) from a RESOURCE_EXHAUSTED answer's status details: the RetryHint, or
    a bare standard RetryInfo; None without either."""
    found: tuple[float, str] | None = None
    for detail in status.details if status is not None else ():
        hint = agentlink_pb2.RetryHint()
        info = error_details_pb2.RetryInfo()
        if detail.Is(hint.DESCRIPTOR) and detail.Unpack(hint):
            return _seconds(hint.retry_after), hint.agent
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            found = (_seconds(info.retry_delay), "")
    return found


def _seconds(d: duration_pb2.Duration) -> float:
    return min(3600.0, max(0.0, d.seconds + d.nanos / 1e9))


def _transport_hint(message: str, trust: str) -> str:
    """What to do about the usual TLS failures, instead of gRPC's C-core wording."""
    if "CERTIFICATE_VERIFY_FAILED" in message or "certificate verify failed" in message:
        return (
            f"its TLS certificate did not verify against {trust or 'the trusted CAs'}; give "
            f"the coordinator's CA with --ca-file or {tls.ENV_CA_FILE}"
        )
    if "WRONG_VERSION_NUMBER" in message or "Ssl handshake failed" in message:
        return (
            "the TLS handshake failed (a development coordinator speaks plain text: use "
            f"--insecure or {tls.ENV_INSECURE}=1 for it on loopback)"
        )
    if trust == "plain text" and "Socket closed" in message:
        # A TLS server hangs up on the plain HTTP/2 preface at once: a shell that once sourced
        # a dev coordinator's dev.env (JITMESH_INSECURE=1) pointed at a `serve` coordinator.
        return (
            "it closed the plain-text connection at once (a coordinator started with `serve` "
            f"speaks TLS: leave out --insecure and unset {tls.ENV_INSECURE}, and give its CA "
            f"with --ca-file or {tls.ENV_CA_FILE})"
        )
    return message or "the coordinator is unavailable"


def _one_line(text: str) -> str:
    # Server messages reach terminals and log lines: one line, no control characters, bounded.
    text = _CONTROL.sub("?", " ".join(text.split()))
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _invalid(exc: ValueError) -> errors.InvalidArgumentError:
    return errors.InvalidArgumentError(str(exc))


def _check(pattern: re.Pattern[str], value: str, field: str) -> str:
    try:
        return validation.check(pattern, value, field)
    except validation.ValidationError as exc:
        raise _invalid(exc) from None


def _check_id(value: str, kind: str) -> str:
    try:
        return validation.check_id(value, kind)
    except validation.ValidationError as exc:
        raise _invalid(exc) from None


def _check_optional(pattern: re.Pattern[str], value: str, field: str) -> str:
    """Filters use "" for "any"; anything else must have the shape of the field."""
    return value if value == "" else _check(pattern, value, field)


def _check_reason(value: str, *, field: str = "reason") -> str:
    try:
        return validation.check_reason(value, field=field)
    except validation.ValidationError as exc:
        raise _invalid(exc) from None


def _check_labels(value: dict[str, str], field: str) -> dict[str, str]:
    try:
        return validation.check_labels(value, field=field)
    except validation.ValidationError as exc:
        raise _invalid(exc) from None


def _check_positive(value: timedelta, field: str) -> timedelta:
    if value <= timedelta(0):
        raise errors.InvalidArgumentError(f"{field} must be positive")
    return value


def _check_token(token: str) -> None:
    # gRPC refuses header values outside visible ASCII with an opaque error at call time; say so
    # up front, without echoing the token.
    if not all("!" <= c <= "~" for c in token):
        raise errors.InvalidArgumentError("token contains characters that cannot be sent")


def _sdk_version() -> str:
    try:
        return metadata.version("jitmesh")
    except metadata.PackageNotFoundError:
        return "0"


class Client:
    """A connection to one coordinator. Create it with `await Client.connect(...)`.

    Use it as an async context manager (or call `close()`) so the channel is closed. A client
    belongs to the event loop it was created in.
    """

    def __init__(
        self,
        channel: aio.Channel,
        *,
        target: str,
        token: str | None,
        timeout: float,
        trust: str = "",
        pushback_wait: float = PUSHBACK_WAIT,
    ) -> None:
        self._pushback_wait = pushback_wait
        self._channel = channel
        self._target = target
        self._trust = trust
        self._token = token
        self._timeout = timeout
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._closed = False
        self._access = access_pb2_grpc.AccessStub(channel)
        self._agents = agents_pb2_grpc.AgentsStub(channel)
        self._policy = policy_pb2_grpc.PolicyStub(channel)
        self._audit = audit_pb2_grpc.AuditStub(channel)
        self._identity = identity_pb2_grpc.IdentityStub(channel)
        self._locks = locks_pb2_grpc.LocksStub(channel)
        self._breakglass = breakglass_pb2_grpc.BreakglassStub(channel)
        self._notify = notify_pb2_grpc.NotifyStub(channel)
        self._mesh = mesh_pb2_grpc.MeshStub(channel)

    @classmethod
    async def connect(
        cls,
        target: str,
        *,
        token: str | None = None,
        # A per-call gRPC deadline, which reaches the server; not a timeout of this coroutine.
        timeout: float = 10.0,  # noqa: ASYNC109
        ca_file: str | PathLike[str] | None = None,
        insecure: bool | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, str | int]] = (),
        pushback_wait: float = PUSHBACK_WAIT,
    ) -> Self:
        """Open a channel to the coordinator at `target` ("host:port"; for coordinator
        replicas, one DNS name resolving to several, or in plain text several IP addresses
        "10.0.0.1:7443,10.0.0.2:7443": calls go to one and move to the next when it fails).

        Does not contact the coordinator: the first call does, and reports an unreachable
        coordinator as `UnavailableError`. `token` is sent as `authorization: Bearer <token>` on
        every call (None or "" sends none). `timeout` is the deadline in seconds of each unary
        call; streams have none.

        The channel is TLS unless told otherwise (`jitmesh.tls`): `ca_file` pins the
        coordinator's CA; without it the system's trust store is used; `insecure=True` speaks
        plain text (for a development coordinator on loopback). Unset arguments come from
        `JITMESH_CA_FILE` and `JITMESH_INSECURE`; an explicit argument beats the environment.
        `credentials` (ready-made gRPC credentials, e.g. with a client certificate) beats both.

        `pushback_wait`: for how long, in seconds, a request or approval refused because its
        agent is behind (RESOURCE_EXHAUSTED with a retry hint) is tried again, each time after
        the coordinator's hint; then `RateLimitedError` (with `retry_after`) is raised. 0 raises
        at once.

        A coroutine because gRPC channels bind to the running event loop.
        """
        if not target.strip():
            raise errors.InvalidArgumentError("coordinator address is empty")
        if not timeout > 0:
            raise errors.InvalidArgumentError("timeout must be positive")
        if token:
            _check_token(token)
        options = [("grpc.primary_user_agent", f"jitmesh-sdk/{_sdk_version()}"), *channel_options]
        if credentials is not None:
            trust = "the given credentials"
        else:
            transport = tls.choose(target.split(",")[0], ca_file=ca_file, insecure=insecure)
            credentials = transport.credentials()
            trust = transport.trust
        dial = _dial_target(target)
        if credentials is not None and dial != target:
            # One channel over several addresses has one TLS name to check, and no name is on
            # every replica's certificate but the DNS name they share (`--tls-name`): the
            # handshake would fail with "Hostname Verification Check failed".
            raise errors.InvalidArgumentError(
                "several coordinator addresses work in plain text only; over TLS give one DNS "
                "name that resolves to every replica and that their certificates cover "
                "(jitmesh-coordinator serve --tls-name NAME), or a TCP load balancer's address"
            )
        if credentials is None:
            channel = aio.insecure_channel(dial, options=options)
        else:
            channel = aio.secure_channel(dial, credentials, options=options)
        if not pushback_wait >= 0:
            raise errors.InvalidArgumentError("pushback_wait must not be negative")
        return cls(
            channel,
            target=target,
            token=token or None,
            timeout=timeout,
            trust=trust,
            pushback_wait=pushback_wait,
        )

    @classmethod
    async def from_config(
        cls,
        profile: str | None = None,
        *,
        coordinator: str | None = None,
        token: str | None = None,
        ca_file: str | None = None,
        insecure: bool | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 (a per-call deadline, as in connect)
    ) -> Self:
        """Connect the way jitctl does: each setting from the explicit argument, else its
        JITMESH_* variable, else the profile in ~/.config/jitmesh/config.toml (`profile`, else
        JITMESH_PROFILE, else the file's default_profile; see `jitmesh.profiles`)."""
        found = profiles.resolve(
            coordinator=coordinator,
            token=token,
            ca_file=ca_file,
            insecure=insecure,
            profile=profile,
        )
        if not found.coordinator:
            raise errors.InvalidArgumentError(
                "no coordinator: pass coordinator=, set JITMESH_COORDINATOR or use a profile"
            )
        return await cls.connect(
            found.coordinator,
            token=found.token,
            ca_file=found.ca_file,
            insecure=found.insecure,
            timeout=timeout,
        )

    @property
    def target(self) -> str:
        return self._target

    def __repr__(self) -> str:
        # Never the token.
        return f"Client(target={self._target!r})"

    async def close(self) -> None:
        """Close the channel, cancelling calls and streams still running. Idempotent."""
        if not self._closed:
            self._closed = True
            await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -----------------------------------------------------------------------------------------
    # Plumbing

    def _error(self, exc: aio.AioRpcError, timeout: float | None) -> errors.JitmeshError:
        status = rich_status(exc)
        error = error_from_status(
            exc.code(),
            exc.details(),
            target=self._target,
            timeout=timeout,
            secrets=(self._token or "",),
            trust=self._trust,
            reason=error_reason(status),
        )
        if isinstance(error, errors.RateLimitedError):
            hint = retry_hint(status)
            if hint is not None:
                error.retry_after, error.agent = hint
        return error

    async def _honouring_pushback(
        self, method: aio.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req
    ) -> _Resp:
        """`_unary` for calls the coordinator may refuse with a retry hint before it writes
        anything (docs/wire.md, "Pushback"): waits at least the hint (plus jitter, so refused
        callers do not come back together) and calls again, for up to `pushback_wait` in all."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._pushback_wait
        while True:
            try:
                return await self._unary(method, request)
            except errors.RateLimitedError as exc:
                if exc.retry_after is None:
                    raise  # a caller's rate limit: slowing down is the caller's choice
                delay = exc.retry_after * (1.0 + 0.5 * random.random())
                if loop.time() + delay > give_up:
                    raise
                await asyncio.sleep(delay)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the jitmesh Client is closed")

    async def _unary(
        self,
        method: aio.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        *,
        # A gRPC deadline, unlike asyncio.timeout, travels to the server, which stops working on
        # the call when it passes.
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> _Resp:
        self._check_open()
        deadline = self._timeout if timeout is None else timeout
        try:
            return await method(request, timeout=deadline, metadata=self._metadata)
        except aio.AioRpcError as exc:
            raise self._error(exc, deadline) from exc

    async def _stream(
        self, method: aio.UnaryStreamMultiCallable[_Req, _Resp], request: _Req
    ) -> AsyncGenerator[_Resp, None]:
        self._check_open()
        call = method(request, metadata=self._metadata)
        try:
            async for item in call:
                yield item
        except aio.AioRpcError as exc:
            raise self._error(exc, None) from exc
        finally:
            call.cancel()

    @staticmethod
    async def _collect(
        fetch: Callable[[str, int], Awaitable[tuple[list[_T], str]]], limit: int | None
    ) -> list[_T]:
        """Follow next_page_token until the last page or until `limit` items."""
        if limit is not None and limit < 1:
            raise errors.InvalidArgumentError("limit must be positive")
        items: list[_T] = []
        token = ""
        seen: set[str] = set()
        while True:
            size = _PAGE_SIZE if limit is None else min(_PAGE_SIZE, limit - len(items))
            page, token = await fetch(token, size)
            items.extend(page)
            if limit is not None and len(items) >= limit:
                return items[:limit]
            if not token:
                return items
            if token in seen:
                # A server that hands out the same page token again would loop us forever.
                raise errors.InternalError("the coordinator repeated a page token")
            seen.add(token)

    # -----------------------------------------------------------------------------------------
    # Requests

    async def create_request(
        self,
        *,
        agent: str = "",
        action: str,
        duration: timedelta,
        reason: str = "",
        ticket: str = "",
        start_at: datetime | None = None,
        selector: Mapping[str, str] | None = None,
    ) -> types.Created:
        """Ask for `action` on `agent` (or on every agent matching `selector`) for `duration`,
        as the caller; `start_at` schedules the start (the duration counts from it).

        Returns the request and, when policy approved it at once, its grant (still to be
        delivered to the agent: see `Grant.state`). When the caller already holds a live grant
        for the agent and action, that grant comes back (`request.reused`) and nothing new is
        made. A named tuple: `request, grant = await client.create_request(...)` works.

        When the agent has more undelivered commands than it could apply before such a grant
        would end, the coordinator refuses with a retry hint; the call waits and tries again
        (for up to the client's `pushback_wait`), then raises `RateLimitedError`.
        """
        if bool(agent) == bool(selector):
            raise errors.InvalidArgumentError("name exactly one of agent and selector")
        message = access_pb2.CreateRequestRequest(
            agent=_check(validation.AGENT, agent, "agent") if agent else "",
            action=_check(validation.ACTION, action, "action"),
            duration=_convert.duration_to_proto(_check_positive(duration, "duration")),
            reason=_check_reason(reason),
            ticket=_check_reason(ticket, field="ticket"),
            start_at=_convert.time_to_proto(start_at),
            selector=_check_labels(dict(selector or {}), "selector"),
        )
        response = await self._honouring_pushback(self._access.CreateRequest, message)
        grant = _convert.grant(response.grant) if response.HasField("grant") else None
        return types.Created(_convert.request(response.request), grant)

    async def request_options(
        self, *, agent: str = "", action: str = ""
    ) -> list[types.RequestOption]:
        """What the caller may ask for now (every agent and action, or only `agent` and
        `action`): the longest duration and the approval each would get."""
        message = access_pb2.ListRequestOptionsRequest(
            agent=_check_optional(validation.AGENT, agent, "agent"),
            action=_check_optional(validation.ACTION, action, "action"),
        )
        response = await self._unary(self._access.ListRequestOptions, message)
        return [_convert.request_option(o) for o in response.options]

    async def get_request(self, id: str) -> types.Request:
        message = access_pb2.GetRequestRequest(id=_check_id(id, "request"))
        return _convert.request(await self._unary(self._access.GetRequest, message))

    async def list_requests(
        self,
        *,
        states: Iterable[types.RequestState] = (),
        subject: str = "",
        agent: str = "",
        limit: int | None = None,
        reviewable: bool = False,
    ) -> list[types.Request]:
        """Requests the caller may see, filtered; empty filters match anything. `reviewable`:
        only the pending requests the caller may approve now.

        Follows the coordinator's pages; stops after `limit` requests when given.
        """
        wire_states = [_convert.request_state_to_proto(s) for s in states]
        subject = _check_optional(validation.SUBJECT, subject, "subject")
        agent = _check_optional(validation.AGENT, agent, "agent")

        async def fetch(token: str, size: int) -> tuple[list[types.Request], str]:
            message = access_pb2.ListRequestsRequest(
                states=wire_states,
                subject=subject,
                agent=agent,
                page_size=size,
                page_token=token,
                reviewable=reviewable,
            )
            response = await self._unary(self._access.ListRequests, message)
            return [_convert.request(r) for r in response.requests], response.next_page_token

        return await self._collect(fetch, limit)

    async def approve(self, id: str, *, reason: str = "", on_behalf_of: str = "") -> types.Reviewed:
        """Approve a pending request as the caller.

        Returns the request and, when this approval was the last one required, the new grant
        (a named tuple: `request, grant = ...` works). Raises `ConflictError` when the request
        is no longer pending, `PermissionDeniedError` (saying who may) when the caller's
        approval would not count now.

        `on_behalf_of`: review in the name of that user (a notification bridge relaying the
        user's click). Only a token with scope `review-on-behalf` may; the user's own groups
        decide, and the audit log records "user via <the token's user>".
        """
        return types.Reviewed(
            *await self._review(id, types_pb2.REVIEW_DECISION_APPROVE, reason, on_behalf_of)
        )

    async def deny(self, id: str, *, reason: str = "", on_behalf_of: str = "") -> types.Request:
        """Deny a pending request. A deny that races an approval wins. `on_behalf_of` as in
        `approve`."""
        request, _ = await self._review(id, types_pb2.REVIEW_DECISION_DENY, reason, on_behalf_of)
        return request

    async def _review(
        self,
        id: str,
        decision: types_pb2.ReviewDecision.ValueType,
        reason: str,
        on_behalf_of: str = "",
    ) -> tuple[types.Request, types.Grant | None]:
        message = access_pb2.ReviewRequestRequest(
            id=_check_id(id, "request"),
            decision=decision,
            reason=_check_reason(reason),
            on_behalf_of=_check_optional(validation.SUBJECT, on_behalf_of, "on_behalf_of"),
        )
        response = await self._honouring_pushback(self._access.ReviewRequest, message)
        grant = _convert.grant(response.grant) if response.HasField("grant") else None
        return _convert.request(response.request), grant

    async def cancel(self, id: str) -> types.Request:
        """Withdraw a pending request (the requester's own)."""
        message = access_pb2.CancelRequestRequest(id=_check_id(id, "request"))
        return _convert.request(await self._unary(self._access.CancelRequest, message))

    async def watch_requests(
        self, ids: Iterable[str] = (), *, after_change_seq: int = 0
    ) -> AsyncGenerator[types.Request, None]:
        """Snapshots of requests as they or their grants change; `ids` empty means all visible.

        Each snapshot of a change carries `change_seq`, a cursor: subscribing again with
        `after_change_seq` set to the last one received first sends every request changed
        since (in its current state), so nothing is lost across a reconnect.

        The coordinator sends the current snapshot of each watched request first, then one
        whenever it changes. The stream has no deadline; it ends (or raises
        `UnavailableError`) when the coordinator closes it, and the caller may subscribe again.
        Close it with `contextlib.aclosing` (or `aclose()`) when done early.
        """
        message = access_pb2.WatchRequestsRequest(
            ids=[_check_id(i, "request") for i in ids],
            after_change_seq=max(after_change_seq, 0),
        )
        async for snapshot in self._stream(self._access.WatchRequests, message):
            yield _convert.request(snapshot)

    async def wait_for_request(
        self,
        id: str,
        *,
        until: Callable[[types.Request], bool],
        # Part of the public contract (it shapes the error raised); asyncio.timeout around the
        # call would work too but would raise TimeoutError instead of a JitmeshError.
        timeout: timedelta | float,  # noqa: ASYNC109
    ) -> types.Request:
        """The first snapshot of request `id` for which `until(snapshot)` holds.

        Built on `watch_requests`: the current state counts, so a request already in the awaited
        state returns at once. When the coordinator ends the stream (a restart, a recycled
        connection) the wait subscribes again. Raises `DeadlineExceededError` when `timeout`
        (seconds or a timedelta) passes first; `until` must also accept states from which the
        awaited one can no longer be reached, or the wait runs into the timeout.
        """
        _check_id(id, "request")
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
        last: types.Request | None = None
        try:
            async with asyncio.timeout(seconds):
                backoff = _RESUBSCRIBE_MIN
                while True:
                    with contextlib.suppress(errors.UnavailableError):
                        async with contextlib.aclosing(self.watch_requests([id])) as stream:
                            async for snapshot in stream:
                                if snapshot.id != id:
                                    continue
                                last = snapshot
                                backoff = _RESUBSCRIBE_MIN
                                if until(snapshot):
                                    return snapshot
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _RESUBSCRIBE_MAX)
        except TimeoutError:
            state = f" (still {last.state.value.lower()})" if last is not None else ""
            waited = format_duration(timedelta(seconds=seconds))
            raise errors.DeadlineExceededError(
                f"gave up waiting for request {id} after {waited}{state}"
            ) from None

    # -----------------------------------------------------------------------------------------
    # Grants

    async def get_grant(self, id: str) -> types.Grant:
        message = access_pb2.GetGrantRequest(id=_check_id(id, "grant"))
        return _convert.grant(await self._unary(self._access.GetGrant, message))

    async def list_grants(
        self,
        *,
        states: Iterable[types.GrantState] = (),
        subject: str = "",
        agent: str = "",
        limit: int | None = None,
    ) -> list[types.Grant]:
        """Grants the caller may see, filtered; empty filters match anything. Follows pages."""
        wire_states = [_convert.grant_state_to_proto(s) for s in states]
        subject = _check_optional(validation.SUBJECT, subject, "subject")
        agent = _check_optional(validation.AGENT, agent, "agent")

        async def fetch(token: str, size: int) -> tuple[list[types.Grant], str]:
            message = access_pb2.ListGrantsRequest(
                states=wire_states, subject=subject, agent=agent, page_size=size, page_token=token
            )
            response = await self._unary(self._access.ListGrants, message)
            return [_convert.grant(g) for g in response.grants], response.next_page_token

        return await self._collect(fetch, limit)

    async def revoke_grant(self, id: str, *, reason: str = "") -> types.Grant:
        """Take a grant away before it expires. The returned grant is usually REVOKING: the
        agent confirms the removal asynchronously (REVOKED, or REVOKE_FAILED)."""
        message = access_pb2.RevokeGrantRequest(
            id=_check_id(id, "grant"), reason=_check_reason(reason)
        )
        return _convert.grant(await self._unary(self._access.RevokeGrant, message))

    async def extend_grant(
        self, id: str, *, by: timedelta, reason: str = "", ticket: str = ""
    ) -> types.Extended:
        """Move the end of the caller's live grant `by` later, in place (same grant, no gap on
        the host), within its rule's bounds. Where the rule asks for approval again, the grant
        comes back unchanged with a pending extension `request` (approving it extends)."""
        message = access_pb2.ExtendGrantRequest(
            id=_check_id(id, "grant"),
            by=_convert.duration_to_proto(_check_positive(by, "by")),
            reason=_check_reason(reason),
            ticket=_check_reason(ticket, field="ticket"),
        )
        response = await self._unary(self._access.ExtendGrant, message)
        pending = _convert.request(response.request) if response.HasField("request") else None
        return types.Extended(_convert.grant(response.grant), pending)

    @contextlib.asynccontextmanager
    async def grant(
        self,
        agent: str,
        action: str,
        duration: timedelta,
        *,
        reason: str = "",
        ticket: str = "",
        timeout: timedelta | float = timedelta(minutes=10),  # noqa: ASYNC109
    ) -> AsyncGenerator[types.Grant, None]:
        """Access for the body of an `async with`: request it, wait until it is approved and
        applied on the host, yield the ACTIVE grant, and release it on exit, also on an error
        or a cancellation.

            async with client.grant("db-1", "deploy", timedelta(minutes=15), reason="INC-7") as g:
                await run_the_deploy()

        Only a grant this call created is released: when the caller already held a live grant
        for the agent and action, that grant is yielded (`request.reused`) and left as it was.
        A request still undecided (or scheduled) when the body is left (a timeout, a
        cancellation, also one that comes while the request is being made) is cancelled.
        Raises `PermissionDeniedError` when the request is denied (or expires, or is
        cancelled), `DeadlineExceededError` when `timeout` passes first, and `ConflictError`
        when the grant could not be applied on the host.
        """
        creating = asyncio.ensure_future(
            self.create_request(
                agent=agent, action=action, duration=duration, reason=reason, ticket=ticket
            )
        )
        try:
            created = await asyncio.shield(creating)
        except asyncio.CancelledError:
            # Cancelled while the request was being made: the coordinator may have made it all
            # the same, so it is cancelled (or its grant released) before this gives up.
            with contextlib.suppress(Exception):
                made = await creating
                await self._let_go(
                    made.request.id, not (made.request.reused or made.request.extends_grant_id)
                )
            raise
        request = created.request
        # A reused grant (or one an extension request will extend) belongs to an earlier
        # request: never released here.
        mine = not (request.reused or request.extends_grant_id)
        try:
            final = await self.wait_for_request(request.id, until=_grant_settled, timeout=timeout)
            if final.state is not types.RequestState.APPROVED:
                who = f" by {final.decided_by}" if final.decided_by else ""
                why = f": {final.decision_reason}" if final.decision_reason else ""
                raise errors.PermissionDeniedError(
                    f"request {final.id} was {final.state.value.lower()}{who}{why}"
                )
            held = await self.get_grant(final.grant_id)
            if held.state is not types.GrantState.ACTIVE:
                detail = f": {held.failure}" if held.failure else ""
                raise errors.ConflictError(
                    f"grant {held.id} is {held.state.value.lower()} on {held.agent}{detail}"
                )
            yield held
        finally:
            await asyncio.shield(self._let_go(request.id, mine))

    async def _let_go(self, request_id: str, mine: bool) -> None:
        """Release the grant the request made (when it is this caller's own) or cancel the
        request when it is still undecided. Errors are left out: the body's own error, if any,
        is the one that matters, and an ended grant needs nothing."""
        with contextlib.suppress(errors.JitmeshError):
            current = await self.get_request(request_id)
            if current.state in (types.RequestState.PENDING, types.RequestState.SCHEDULED):
                await self.cancel(request_id)
            elif mine and current.grant_id and current.state is types.RequestState.APPROVED:
                await self.release_grant(current.grant_id)

    async def release_grant(self, id: str) -> types.Grant:
        """Hand a grant back before it expires (its subject's own)."""
        message = access_pb2.ReleaseGrantRequest(id=_check_id(id, "grant"))
        return _convert.grant(await self._unary(self._access.ReleaseGrant, message))

    # -----------------------------------------------------------------------------------------
    # Locks

    async def create_lock(
        self,
        *,
        subject: str = "",
        agent: str = "",
        action: str = "",
        reason: str,
        ttl: timedelta | None = None,
    ) -> tuple[types.Lock, int, int]:
        """Emergency stop (admins): revoke every live grant matching subject, agent and action
        (the ones given; at least one), deny matching pending requests, and refuse new ones until
        the lock is lifted or `ttl` passes. Returns the lock, grants revoked, requests denied."""
        target = types.LockTarget(
            subject=_check_optional(validation.SUBJECT, subject, "subject"),
            agent=_check_optional(validation.AGENT, agent, "agent"),
            action=_check_optional(validation.ACTION, action, "action"),
        )
        if not (target.subject or target.agent or target.action):
            raise errors.InvalidArgumentError("a lock needs a subject, an agent or an action")
        if not reason.strip():
            raise errors.InvalidArgumentError("a lock needs a reason")
        message = locks_pb2.CreateLockRequest(
            target=_convert.lock_target_to_proto(target),
            reason=_check_reason(reason),
            ttl=_convert.duration_to_proto(None if ttl is None else _check_positive(ttl, "ttl")),
        )
        response = await self._unary(self._locks.CreateLock, message)
        return _convert.lock(response.lock), response.grants_revoked, response.requests_denied

    async def status(self) -> types.MeshStatus:
        """The mesh at a glance: agents, waiting requests, grants by state, unacknowledged
        revokes and commands (admins)."""
        r = await self._unary(self._mesh.Status, mesh_pb2.StatusRequest())
        return types.MeshStatus(
            coordinator_time=_convert.time_or_none(r.coordinator_time),
            version=r.version,
            replica=r.replica,
            epoch=r.epoch,
            agents_enrolled=r.agents_enrolled,
            agents_connected=r.agents_connected,
            requests={_convert.request_state(c.state): c.count for c in r.requests},
            grants={_convert.grant_state(c.state): c.count for c in r.grants},
            revokes_unacknowledged=r.revokes_unacknowledged,
            commands_unacknowledged=r.commands_unacknowledged,
            policy_version=r.policy_version,
            audit_head_seq=r.audit_head_seq,
            locks_in_force=r.locks_in_force,
            replicas=tuple(
                types.Replica(
                    id=x.id,
                    address=x.address,
                    version=x.version,
                    started_at=_convert.time_or_none(x.started_at),
                    last_seen_at=_convert.time_or_none(x.last_seen_at),
                    agents_connected=x.agents_connected,
                )
                for x in r.replicas
            ),
        )

    async def list_locks(self, *, include_ended: bool = False) -> list[types.Lock]:
        """Locks in force, newest first (with `include_ended`, lifted and expired ones too)."""
        message = locks_pb2.ListLocksRequest(include_ended=include_ended)
        response = await self._unary(self._locks.ListLocks, message)
        return [_convert.lock(x) for x in response.locks]

    async def lift_lock(self, id: str, *, reason: str = "") -> types.Lock:
        """End a lock: matching requests may be made and approved again (revoked grants stay
        revoked)."""
        message = locks_pb2.LiftLockRequest(id=_check_id(id, "lock"), reason=_check_reason(reason))
        return _convert.lock(await self._unary(self._locks.LiftLock, message))

    # -----------------------------------------------------------------------------------------
    # Break-glass (admins)

    async def issue_breakglass_codes(
        self,
        agent: str,
        action: str,
        subject: str,
        duration: timedelta,
        *,
        valid_for: timedelta,
        count: int = 1,
        reason: str = "",
    ) -> list[tuple[types.BreakglassCode, str]]:
        """Single-use codes for `subject` to get `action` on `agent` for `duration`, usable
        until `valid_for` from now, each with its text. The text is shown only here: hand it
        over out of band (the coordinator keeps only its hash). The agent verifies a code
        itself, also while cut off from the coordinator (`jitmesh-agent breakglass CODE`)."""
        message = breakglass_pb2.IssueBreakglassCodesRequest(
            agent=_check(validation.AGENT, agent, "agent"),
            subject=_check(validation.SUBJECT, subject, "subject"),
            action=_check(validation.ACTION, action, "action"),
            duration=_convert.duration_to_proto(_check_positive(duration, "duration")),
            valid_for=_convert.duration_to_proto(_check_positive(valid_for, "valid_for")),
            count=count,
            reason=_check_reason(reason),
        )
        response = await self._unary(self._breakglass.IssueBreakglassCodes, message)
        return [(_convert.breakglass_code(c.info), c.code) for c in response.codes]

    async def list_breakglass_codes(
        self,
        *,
        unreviewed: bool = False,
        agent: str = "",
        subject: str = "",
        include_expired: bool = False,
    ) -> list[types.BreakglassCode]:
        """Codes, newest first: with `unreviewed`, only used codes nobody has reviewed yet;
        otherwise unused expired codes only with `include_expired`."""
        message = breakglass_pb2.ListBreakglassCodesRequest(
            unreviewed=unreviewed, agent=agent, subject=subject, include_expired=include_expired
        )
        response = await self._unary(self._breakglass.ListBreakglassCodes, message)
        return [_convert.breakglass_code(c) for c in response.codes]

    async def review_breakglass_use(self, id: str, *, note: str = "") -> types.BreakglassCode:
        """Mark a used code as reviewed, with what the reviewer found."""
        message = breakglass_pb2.ReviewBreakglassUseRequest(
            id=id, note=_check_reason(note, field="note")
        )
        return _convert.breakglass_code(
            await self._unary(self._breakglass.ReviewBreakglassUse, message)
        )

    # -----------------------------------------------------------------------------------------
    # Agents

    async def list_agents(self) -> list[types.Agent]:
        """Every enrolled agent with its connection state. Follows pages."""

        async def fetch(token: str, size: int) -> tuple[list[types.Agent], str]:
            message = agents_pb2.ListAgentsRequest(page_size=size, page_token=token)
            response = await self._unary(self._agents.ListAgents, message)
            return [_convert.agent(a) for a in response.agents], response.next_page_token

        return await self._collect(fetch, None)

    async def get_agent(self, name: str) -> types.Agent:
        message = agents_pb2.GetAgentRequest(name=_check(validation.AGENT, name, "agent"))
        return _convert.agent(await self._unary(self._agents.GetAgent, message))

    async def create_join_token(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        ttl: timedelta | None = None,
        replaces: str = "",
    ) -> types.JoinToken:
        """A one-time token an agent enrolls with. `ttl` None means the coordinator's default.

        The agent gets exactly `labels` (asking for others is refused). A name already enrolled
        can only be enrolled again with a token that `replaces` it (a reinstalled host): the old
        certificate then stops working; with no labels given, the agent's labels are kept.
        The token is shown only here: the coordinator keeps its hash.
        """
        try:
            checked = validation.check_labels(dict(labels or {}))
        except validation.ValidationError as exc:
            raise _invalid(exc) from None
        message = agents_pb2.CreateJoinTokenRequest(
            labels=checked,
            ttl=_convert.duration_to_proto(None if ttl is None else _check_positive(ttl, "ttl")),
            replaces=_check_optional(validation.AGENT, replaces, "replaces"),
        )
        return _convert.join_token(await self._unary(self._agents.CreateJoinToken, message))

    async def list_join_tokens(self, *, include_ended: bool = False) -> list[types.JoinTokenInfo]:
        """Join tokens (never the tokens themselves), oldest first: those that can still enroll
        an agent, or all with `include_ended`. Admins only."""
        message = agents_pb2.ListJoinTokensRequest(include_ended=include_ended)
        response = await self._unary(self._agents.ListJoinTokens, message)
        return [_convert.join_token_info(t) for t in response.tokens]

    async def revoke_join_token(self, id: str, *, reason: str = "") -> types.JoinTokenInfo:
        """From now on the join token (by the id `list_join_tokens` shows) enrolls nothing.
        Agents already enrolled with it stay. Admins only."""
        message = agents_pb2.RevokeJoinTokenRequest(id=id.strip(), reason=_check_reason(reason))
        return _convert.join_token_info(await self._unary(self._agents.RevokeJoinToken, message))

    async def set_user_groups(
        self, user: str, groups: Iterable[str], *, reason: str = ""
    ) -> types.UserInfo:
        """Replace a user's groups (the only way they change: creating a token for an existing
        user never does). Audited. Admins only."""
        message = identity_pb2.SetUserGroupsRequest(
            user=_check(validation.SUBJECT, user, "user"),
            groups=[_check(validation.GROUP, g, "group") for g in groups],
            reason=_check_reason(reason),
        )
        return _convert.user_info(await self._unary(self._identity.SetUserGroups, message))

    async def remove_agent(self, name: str) -> None:
        """Forget an agent: its credential stops working and its grants are revoked."""
        message = agents_pb2.RemoveAgentRequest(name=_check(validation.AGENT, name, "agent"))
        await self._unary(self._agents.RemoveAgent, message)

    # -----------------------------------------------------------------------------------------
    # Operator tokens and users (admins)

    async def create_token(
        self,
        user: str,
        *,
        groups: Iterable[str] = (),
        ttl: timedelta | None = None,
        label: str = "",
        scopes: Iterable[str] = (),
    ) -> tuple[str, types.TokenInfo]:
        """A new bearer token for `user` (created with `groups` if new): the token, shown once,
        and its listing. Every token expires (default 30 days, at most 365).

        `scopes` restricts what the token may do; `("review-on-behalf",)` makes a notification
        bridge's credential, which may only review in the name of a user it authenticated."""
        message = identity_pb2.CreateTokenRequest(
            user=_check(validation.SUBJECT, user, "user"),
            groups=[_check(validation.GROUP, g, "group") for g in groups],
            ttl=_convert.duration_to_proto(None if ttl is None else _check_positive(ttl, "ttl")),
            label=label,
            scopes=list(scopes),
        )
        response = await self._unary(self._identity.CreateToken, message)
        return response.token, _token_info(response.info)

    async def list_tokens(self, user: str = "") -> list[types.TokenInfo]:
        user = _check_optional(validation.SUBJECT, user, "user")
        message = identity_pb2.ListTokensRequest(user=user)
        response = await self._unary(self._identity.ListTokens, message)
        return [_token_info(t) for t in response.tokens]

    async def revoke_token(self, token_id: str) -> None:
        """Revoke a token by the id `list_tokens` shows; its next call is refused."""
        message = identity_pb2.RevokeTokenRequest(id=token_id)
        await self._unary(self._identity.RevokeToken, message)

    async def revoke_certificate(self, serial: str, *, reason: str = "") -> None:
        """Refuse an operator client certificate, by its serial number (hexadecimal), from its
        next call on."""
        message = identity_pb2.RevokeCertificateRequest(serial=serial, reason=_check_reason(reason))
        await self._unary(self._identity.RevokeCertificate, message)

    async def set_user_disabled(self, user: str, disabled: bool = True) -> None:
        """Disable (or enable) a user: every call with any of their tokens is refused."""
        message = identity_pb2.SetUserDisabledRequest(
            user=_check(validation.SUBJECT, user, "user"), disabled=disabled
        )
        await self._unary(self._identity.SetUserDisabled, message)

    # -----------------------------------------------------------------------------------------
    # Single sign-on (these two calls need no token)

    async def whoami(self) -> types.UserInfo:
        """The user this client's credential belongs to."""
        response = await self._unary(self._identity.WhoAmI, identity_pb2.WhoAmIRequest())
        return _convert.user_info(response)

    async def sign_in_config(self) -> types.SignInConfig:
        """The coordinator's identity provider settings; NotFoundError without single sign-on."""
        response = await self._unary(
            self._identity.GetSignInConfig, identity_pb2.GetSignInConfigRequest()
        )
        return types.SignInConfig(
            issuer=response.issuer,
            client_id=response.client_id,
            scopes=tuple(response.scopes),
            audience=response.audience,
        )

    async def exchange_id_token(
        self, id_token: str, *, nonce: str, ttl: timedelta | None = None
    ) -> tuple[str, types.TokenInfo]:
        """Exchange an OpenID Connect ID token (with the nonce of the sign-in that produced it)
        for a short-lived jitmesh token: the token, shown once, and its listing."""
        message = identity_pb2.ExchangeIdTokenRequest(
            id_token=id_token,
            nonce=nonce,
            ttl=_convert.duration_to_proto(None if ttl is None else _check_positive(ttl, "ttl")),
        )
        response = await self._unary(self._identity.ExchangeIdToken, message)
        return response.token, _token_info(response.info)

    # -----------------------------------------------------------------------------------------
    # Notification receivers (admins)

    async def add_receiver(
        self,
        name: str,
        kind: str,
        *,
        target: str = "",
        route: types.NotifyRoute | None = None,
        settings: Mapping[str, str] | None = None,
        secret: str = "",
        secret_file: str = "",
    ) -> types.NotifyReceiver:
        """Add a receiver (`kind`: webhook, slack or email). The secret (HMAC key, Slack bot
        token or webhook URL, SMTP password) is sealed by the coordinator and never returned;
        or give `secret_file`, a path on the coordinator's host read when sending."""
        kinds = {
            "webhook": notify_pb2.RECEIVER_KIND_WEBHOOK,
            "slack": notify_pb2.RECEIVER_KIND_SLACK,
            "email": notify_pb2.RECEIVER_KIND_EMAIL,
        }
        if kind not in kinds:
            raise errors.InvalidArgumentError("receiver kind must be webhook, slack or email")
        route = route or types.NotifyRoute()
        message = notify_pb2.AddReceiverRequest(
            receiver=notify_pb2.Receiver(
                name=name,
                kind=kinds[kind],
                target=target,
                route=notify_pb2.Route(
                    events=list(route.events),
                    agent_labels=dict(route.agent_labels),
                    actions=list(route.actions),
                    rules=list(route.rules),
                    requesters=route.requesters,
                ),
                settings=dict(settings or {}),
            ),
            secret=secret,
            secret_file=secret_file,
        )
        return _receiver(await self._unary(self._notify.AddReceiver, message))

    async def list_receivers(self) -> list[types.NotifyReceiver]:
        response = await self._unary(self._notify.ListReceivers, notify_pb2.ListReceiversRequest())
        return [_receiver(r) for r in response.receivers]

    async def remove_receiver(self, name: str) -> None:
        await self._unary(self._notify.RemoveReceiver, notify_pb2.RemoveReceiverRequest(id=name))

    async def list_deliveries(
        self, *, receiver: str = "", limit: int = 100
    ) -> list[types.NotifyDelivery]:
        """Deliveries, newest notice first: state, attempts, the last error (never a secret)."""
        out: list[types.NotifyDelivery] = []
        token = ""
        while len(out) < limit:
            message = notify_pb2.ListDeliveriesRequest(
                receiver_id=receiver, page_size=min(_PAGE_SIZE, limit - len(out)), page_token=token
            )
            response = await self._unary(self._notify.ListDeliveries, message)
            out.extend(_delivery(d) for d in response.deliveries)
            token = response.next_page_token
            if not token:
                break
        return out

    # -----------------------------------------------------------------------------------------
    # Policy

    async def get_policy(self) -> types.PolicyDocument:
        return _convert.policy_document(
            await self._unary(self._policy.GetPolicy, policy_pb2.GetPolicyRequest())
        )

    async def apply_policy(
        self, yaml_text: str, *, expected_version: int = 0, dry_run: bool = False
    ) -> types.PolicyDocument:
        """Validate and swap in a policy document; a bad document leaves the running one.

        With `expected_version` set, the coordinator refuses (`ConflictError`) unless the running
        version is that one, so two operators cannot overwrite each other unknowingly. With
        `dry_run`, it only validates: the answer is the document as it would be applied (its
        version the next one) and nothing changes.
        """
        if expected_version < 0:
            raise errors.InvalidArgumentError("expected version must not be negative")
        message = policy_pb2.ApplyPolicyRequest(
            yaml=yaml_text, expected_version=expected_version, dry_run=dry_run
        )
        return _convert.policy_document(await self._unary(self._policy.ApplyPolicy, message))

    async def test_policy(
        self,
        *,
        subject: str,
        action: str,
        agent: str,
        duration: timedelta | None = None,
        groups: Iterable[str] = (),
        policy_yaml: str = "",
    ) -> types.PolicyDecision:
        """Would `subject` get `action` on `agent`, and by which rule? Changes nothing.

        `groups` empty means the subject's known groups; `duration` is checked against the
        rule's maximum when given. `policy_yaml` tests that document (validated as
        `apply_policy` would, never stored) instead of the running policy.
        """
        message = policy_pb2.TestPolicyRequest(
            subject=_check(validation.SUBJECT, subject, "subject"),
            action=_check(validation.ACTION, action, "action"),
            agent=_check(validation.AGENT, agent, "agent"),
            duration=_convert.duration_to_proto(
                None if duration is None else _check_positive(duration, "duration")
            ),
            groups=[_check(validation.GROUP, g, "group") for g in groups],
            policy_yaml=policy_yaml,
        )
        return _convert.policy_decision(await self._unary(self._policy.TestPolicy, message))

    # -----------------------------------------------------------------------------------------
    # Audit

    async def list_audit(
        self,
        *,
        since: datetime | None = None,
        agent: str = "",
        subject: str = "",
        kind: str = "",
        grant_id: str = "",
        request_id: str = "",
        after_seq: int = 0,
        limit: int | None = None,
    ) -> list[types.AuditEvent]:
        """Audit events in sequence order, filtered; empty filters match anything.

        `since` must be timezone-aware. Follows pages; stops after `limit` events when given.
        """
        if since is not None and since.tzinfo is None:
            raise errors.InvalidArgumentError("since must be timezone-aware")
        if after_seq < 0:
            raise errors.InvalidArgumentError("after_seq must not be negative")
        agent = _check_optional(validation.AGENT, agent, "agent")
        subject = _check_optional(validation.SUBJECT, subject, "subject")
        grant_id = _check_optional(validation.ID, grant_id, "grant id")
        request_id = _check_optional(validation.ID, request_id, "request id")

        async def fetch(token: str, size: int) -> tuple[list[types.AuditEvent], str]:
            message = audit_pb2.ListEventsRequest(
                since=_convert.time_to_proto(since),
                agent=agent,
                subject=subject,
                kind=kind,
                after_seq=after_seq,
                grant_id=grant_id,
                request_id=request_id,
                page_size=size,
                page_token=token,
            )
            response = await self._unary(self._audit.ListEvents, message)
            return [_convert.audit_event(e) for e in response.events], response.next_page_token

        return await self._collect(fetch, limit)

    async def tail_audit(self, after_seq: int = 0) -> AsyncGenerator[types.AuditEvent, None]:
        """Events with a sequence number above `after_seq`, then new ones as they are written.

        Never ends on its own while the coordinator keeps the stream open.
        """
        if after_seq < 0:
            raise errors.InvalidArgumentError("after_seq must not be negative")
        message = audit_pb2.TailEventsRequest(after_seq=after_seq)
        async for event in self._stream(self._audit.TailEvents, message):
            yield _convert.audit_event(event)

    async def verify_audit(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, see _unary)
    ) -> types.ChainVerification:
        """Walk the audit hash chain on the coordinator and report the first bad entry.

        `timeout` overrides the client's deadline: a long chain takes longer than a lookup.
        """
        response = await self._unary(
            self._audit.VerifyChain, audit_pb2.VerifyChainRequest(), timeout=timeout
        )
        return _convert.chain_verification(response)

    async def export_audit(
        self, *, from_seq: int = 1, to_seq: int | None = None
    ) -> AsyncGenerator[dict[str, object], None]:
        """The audit log as JSON-ready records an outside tool can verify: the public keys
        (`type: key`), every event with its hash fields (`type: event`), and the signed
        checkpoints of the chain head (`type: checkpoint`). See THREAT_MODEL.md for the format.

        `from_seq`/`to_seq` (inclusive) export a range, for archives: consecutive ranges verify
        together (`scripts/verify_audit_export A.jsonl B.jsonl`), and with the live chain."""
        if from_seq < 1 or (to_seq is not None and to_seq < from_seq):
            raise errors.InvalidArgumentError("the range must be 1 <= from <= to")
        response = await self._unary(
            self._audit.ListCheckpoints, audit_pb2.ListCheckpointsRequest()
        )
        for key in response.keys:
            yield {
                "type": "key",
                "key_id": key.key_id,
                "public_key": base64.b64encode(key.public_key).decode(),
            }
        after = from_seq - 1
        done = False
        while not done:
            page = await self.list_audit(after_seq=after, limit=1000)
            for event in page:
                if to_seq is not None and event.seq > to_seq:
                    done = True
                    break
                yield {
                    "type": "event",
                    "seq": event.seq,
                    "id": event.id,
                    "at_ms": to_ms(event.at),
                    "actor": event.actor,
                    "kind": event.kind,
                    "subject": event.subject,
                    "agent": event.agent,
                    "request_id": event.request_id,
                    "grant_id": event.grant_id,
                    "details": dict(event.details),
                    "prev_hash": event.prev_hash,
                    "hash": event.hash,
                }
            if len(page) < 1000:
                break
            after = page[-1].seq
        for cp in response.checkpoints:
            if cp.seq < from_seq or (to_seq is not None and cp.seq > to_seq):
                continue
            yield {
                "type": "checkpoint",
                "seq": cp.seq,
                "hash": cp.hash,
                "at_ms": cp.at_ms,
                "key_id": cp.key_id,
                "signature": base64.b64encode(cp.signature).decode(),
            }


def _token_info(msg: identity_pb2.TokenInfo) -> types.TokenInfo:
    return types.TokenInfo(
        id=msg.id,
        user=msg.user,
        label=msg.label,
        created_at=_convert.required_time(msg.created_at, "created_at"),
        expires_at=_convert.time_or_none(msg.expires_at),
        revoked_at=_convert.time_or_none(msg.revoked_at),
        scopes=tuple(msg.scopes),
    )


def _dial_target(target: str) -> str:
    """The gRPC target for `target`: several comma-separated "ip:port" become one `ipv4:` (or
    `ipv6:`) target, which gRPC's pick_first policy fails over between."""
    parts = [p.strip() for p in target.split(",") if p.strip()]
    if len(parts) <= 1:
        return target
    families = set()
    for part in parts:
        host, sep, port = part.rpartition(":")
        host = host.strip("[]")
        try:
            families.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise errors.InvalidArgumentError(
                "several coordinator addresses must be IP addresses (ip:port,ip:port); for "
                "names, use one DNS name that resolves to every replica"
            ) from None
        if not sep or not port.isdigit():
            raise errors.InvalidArgumentError(f"coordinator address {part!r} has no port")
    if len(families) > 1:
        raise errors.InvalidArgumentError("coordinator addresses mix IPv4 and IPv6")
    return ("ipv4:" if families == {4} else "ipv6:") + ",".join(parts)


def _receiver(r: notify_pb2.Receiver) -> types.NotifyReceiver:
    kinds = {
        notify_pb2.RECEIVER_KIND_WEBHOOK: "webhook",
        notify_pb2.RECEIVER_KIND_SLACK: "slack",
        notify_pb2.RECEIVER_KIND_EMAIL: "email",
    }
    return types.NotifyReceiver(
        name=r.name or r.id,
        kind=kinds.get(r.kind, "unknown"),
        target=r.target,
        route=types.NotifyRoute(
            events=tuple(r.route.events),
            agent_labels=dict(r.route.agent_labels),
            actions=tuple(r.route.actions),
            rules=tuple(r.route.rules),
            requesters=r.route.requesters,
        ),
        settings=dict(r.settings),
        secret_source=r.secret_source,
        created_at=_convert.time_or_none(r.created_at),
        created_by=r.created_by,
    )


def _delivery(d: notify_pb2.Delivery) -> types.NotifyDelivery:
    return types.NotifyDelivery(
        id=d.id,
        receiver=d.receiver_id,
        event_kind=d.event_kind,
        state=notify_pb2.DeliveryState.Name(d.state).removeprefix("DELIVERY_STATE_"),
        attempts=d.attempts,
        last_attempt_at=_convert.time_or_none(d.last_attempt_at),
        next_attempt_at=_convert.time_or_none(d.next_attempt_at),
        last_error=d.last_error,
        request_id=d.request_id,
        grant_id=d.grant_id,
    )
