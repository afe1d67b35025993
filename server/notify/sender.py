"""The outbox sender: routes each notice to the receivers whose routes match, delivers, and
retries with backoff and jitter. Everything it knows is in the store (the outbox, deliveries,
attempts), so a restarted coordinator carries on where the last one stopped: a notice is sent to
one receiver once (a claim keeps other senders off it while one tries, and a success is recorded
before the next claim), and none is lost (a delivery stays PENDING until it succeeded or its
attempts ran out, which the log shows as GAVE_UP)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Protocol

import httpx

from jitmesh.clock import Clock
from server.domain.notices import Notice
from server.domain.receivers import Delivery, ReceiverSpec, split_target, targets

from .base import Links
from .factory import Built, build
from .retry import Attempt, RetryPolicy, attempt
from .secrets import Sealer, SecretError

log = logging.getLogger(__name__)


class Outbox(Protocol):
    """The store's side of the outbox (server/store/)."""

    async def list_receivers(self) -> list[ReceiverSpec]: ...
    async def unrouted(self, limit: int) -> tuple[int, list[tuple[int, Notice]]]: ...
    async def route(
        self, cursor: int, upto: int, deliveries: Sequence[tuple[int, str]], now: datetime
    ) -> bool: ...
    async def claim(self, now: datetime, until: datetime, limit: int) -> list[Delivery]: ...
    async def record(
        self, delivery: Delivery, at: datetime, ok: bool, detail: str, next_at: datetime | None
    ) -> None: ...
    async def release(self, deliveries: Sequence[Delivery]) -> None: ...
    async def next_due(self) -> datetime | None: ...
    async def prune(self, before: datetime) -> int: ...


# What routing needs to know of the world: an agent's labels, a request's rule.
Labels = Callable[[str], Awaitable[Mapping[str, str]]]
RuleOf = Callable[[str], Awaitable[str]]


class Sender:
    def __init__(
        self,
        outbox: Outbox,
        sealer: Sealer,
        clock: Clock,
        links: Links,
        *,
        labels: Labels,
        rule_of: RuleOf,
        policy: RetryPolicy | None = None,
        batch: int = 100,
        lease: timedelta = timedelta(minutes=2),
        poll: timedelta = timedelta(seconds=5),
        rand: Callable[[], float] = random.random,
        timeout: float = 10.0,
        retention: timedelta = timedelta(days=30),
    ) -> None:
        self._outbox = outbox
        self._sealer = sealer
        self._clock = clock
        self._links = links
        self._labels = labels
        self._rule_of = rule_of
        self._policy = policy or RetryPolicy()
        self._batch = batch
        self._lease = lease
        self._poll = poll
        self._rand = rand
        self._timeout = timeout
        self._retention = retention
        self._pruned_at: datetime | None = None
        self._wake = asyncio.Event()
        self.attempts = 0

    def wake(self) -> None:
        """Something was written (a commit with notices, a receiver added): look now."""
        self._wake.set()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=self._timeout) as http:
            while True:
                self._wake.clear()
                try:
                    await self.step(http)
                    await self._prune()
                except Exception:
                    # A store error must not end notifications for good: try again later.
                    log.exception("notify sender step failed")
                await self._nap()

    async def step(self, http: httpx.AsyncClient) -> int:
        """Route what is new, then try every delivery that is due. Returns attempts made."""
        specs = {s.name: s for s in await self._outbox.list_receivers()}
        if not specs:
            # Nothing to send to (and nothing written: this runs after every commit).
            return 0
        receivers: dict[str, Built | None] = {}
        await self._route(specs, receivers, http)
        made = 0
        while True:
            now = self._clock.now()
            claimed = await self._outbox.claim(now, now + self._lease, self._batch)
            if not claimed:
                return made
            for i, delivery in enumerate(claimed):
                try:
                    result = await self._try(delivery, specs, receivers, http)
                except asyncio.CancelledError:
                    await asyncio.shield(self._outbox.release(claimed[i:]))
                    raise
                after = self._clock.now()
                next_at = None
                if not result.ok and result.retryable:
                    next_at = self._policy.next_at(delivery.attempts + 1, after, self._rand())
                await self._outbox.record(delivery, after, result.ok, result.detail, next_at)
                made += 1
                self.attempts += 1
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # A client library turned our cancellation into its own error (aiosmtplib
                    # does while it says QUIT): the attempt is recorded; now stop as asked.
                    await asyncio.shield(self._outbox.release(claimed[i + 1 :]))
                    raise asyncio.CancelledError
                log.log(
                    logging.INFO if result.ok else logging.WARNING,
                    "notice %s receiver=%s event=%s kind=%s attempt=%d detail=%s",
                    "delivered" if result.ok else "not delivered",
                    delivery.receiver,
                    delivery.notice.id,
                    delivery.notice.kind.value,
                    delivery.attempts + 1,
                    result.detail,
                )

    async def _try(
        self,
        delivery: Delivery,
        specs: Mapping[str, ReceiverSpec],
        receivers: dict[str, Built | None],
        http: httpx.AsyncClient,
    ) -> Attempt:
        name, for_requester = split_target(delivery.receiver)
        spec = specs.get(name)
        if spec is None:
            return Attempt(False, "receiver removed", retryable=False)
        built = self._built(spec, receivers, http)
        if built is None:
            return Attempt(False, "receiver misconfigured (see the coordinator's log)")
        receiver = built.personal if for_requester else built.own
        if receiver is None:
            # Changed since this delivery was routed (re-added without that recipient).
            who = "the requester" if for_requester else "recipients of its own"
            return Attempt(False, f"receiver no longer has {who}", retryable=False)
        return await attempt(receiver, delivery.notice, self._links)

    def _built(
        self, spec: ReceiverSpec, receivers: dict[str, Built | None], http: httpx.AsyncClient
    ) -> Built | None:
        if spec.name not in receivers:
            try:
                receivers[spec.name] = build(spec, self._sealer, http, self._clock)
            except (SecretError, ValueError, KeyError) as exc:
                log.error("receiver %s cannot be built: %s", spec.name, exc)
                receivers[spec.name] = None
        return receivers[spec.name]

    async def _prune(self) -> None:
        """Forget notices older than the retention once every receiver is done with them
        (hourly)."""
        now = self._clock.now()
        if self._pruned_at is not None and now - self._pruned_at < timedelta(hours=1):
            return
        self._pruned_at = now
        removed = await self._outbox.prune(now - self._retention)
        if removed:
            log.info("notify outbox pruned notices=%d", removed)

    async def _route(
        self,
        specs: Mapping[str, ReceiverSpec],
        receivers: dict[str, Built | None],
        http: httpx.AsyncClient,
    ) -> None:
        # Whom each receiver can reach: its own recipients, the requester themself. One that
        # cannot be built is routed as if it had its own (its attempts then say why they fail).
        reach: dict[str, tuple[bool, bool]] = {}
        for spec in specs.values():
            built = self._built(spec, receivers, http)
            reach[spec.name] = (
                (True, False)
                if built is None
                else (built.own is not None, built.personal is not None)
            )
        while True:
            cursor, entries = await self._outbox.unrouted(self._batch)
            if not entries:
                return
            pairs: list[tuple[int, str]] = []
            for seq, notice in entries:
                labels = await self._labels(notice.agent) if notice.agent else {}
                rule = await self._rule_of(notice.request_id) if notice.request_id else ""
                for spec in specs.values():
                    own, personal = reach[spec.name]
                    for target in targets(
                        spec.name, spec.route, notice, labels, rule, own=own, personal=personal
                    ):
                        pairs.append((seq, target))
            if not await self._outbox.route(cursor, entries[-1][0], pairs, self._clock.now()):
                continue  # another replica routed these; read on from its cursor
            if len(entries) < self._batch:
                return

    async def _nap(self) -> None:
        due = await self._outbox.next_due()
        nap = self._poll
        if due is not None:
            nap = min(nap, due - self._clock.now())
        seconds = nap.total_seconds()
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()
