"""Break-glass: a verified code becomes a lease the agent grants itself, under the engine lock.

The code's use, its lease and its `breakglass.used` event are one transaction (a code works
once, also across restarts and against two callers at once); the lease is then applied like any
grant (reference-counted) and expires on its own through the expiry loop. The coordinator
learns of it from the event and from every Hello until it adopted the lease.
"""

from __future__ import annotations

import base64
import logging
from datetime import timedelta

from agent.domain.breakglass import Code, Refused, decide_use, grant_id_of
from agent.domain.errors import StateError
from agent.domain.leases import EventKind, Lease, new_event
from agent.engine.clocktrust import ClockTrust
from agent.engine.enforcement import Enforcement
from agent.engine.shared import Shared
from agent.store.base import LeaseStore
from jitmesh.clock import rfc3339

log = logging.getLogger(__name__)


class Breakglass:
    def __init__(
        self,
        *,
        name: str,
        store: LeaseStore,
        shared: Shared,
        time: ClockTrust,
        enforcement: Enforcement,
    ) -> None:
        self._name = name
        self._store = store
        self._shared = shared
        self._time = time
        self._enforcement = enforcement

    async def use(
        self, code: Code, *, caller: str | None, caller_is_root: bool, cap: timedelta
    ) -> Lease | Refused:
        """The lease `code` gives now (applied on the host), or why not."""
        async with self._shared.lock:
            if self._time.untrusted:
                return Refused("the host's clock is not trusted until the coordinator is seen")
            now = self._time.now()
            decision = decide_use(
                code,
                own_name=self._name,
                caller=caller,
                caller_is_root=caller_is_root,
                now=now,
                already_used=await self._store.breakglass_used(code.code_id),
                lease_taken=await self._store.lease(grant_id_of(code.code_id)) is not None,
                locks=await self._store.locks(),
                cap=cap,
            )
            if isinstance(decision, Refused):
                log.warning(
                    "break-glass code refused",
                    extra={
                        "code_id": code.code_id,
                        "subject": code.subject,
                        "error": decision.reason,
                    },
                )
                return decision
            lease, use = decision
            event = new_event(
                EventKind.BREAKGLASS_USED,
                at=now,
                lease=lease,
                details={
                    "code_id": use.code_id,
                    "caller": use.caller,
                    "used_at": rfc3339(now),
                    "not_after": rfc3339(use.not_after),
                    # The spent code, for the coordinator's own check; the link moves it into
                    # the typed detail and never into the text copy (docs/wire.md).
                    "code": base64.urlsafe_b64encode(use.code).decode().rstrip("="),
                },
            )
            holding = await self._enforcement.holding([lease.pair])
            try:
                if not await self._store.record_breakglass(lease, use, event):
                    return Refused("this code was used already (each code works once)")
            except StateError as exc:
                log.error("cannot persist a break-glass use", extra={"error": str(exc)})
                return Refused("the agent cannot record the use now (its disk?): nothing granted")
            failures = await self._enforcement.enforce(holding, starting=[lease])
            reason = failures.apply.get(lease.pair)
            if reason is not None:
                await self._store.mark_failed(lease.grant_id, now, reason)
                log.error(
                    "break-glass lease could not be applied",
                    extra={"grant_id": lease.grant_id, "error": reason},
                )
                return Refused("the host could not apply the access (see the agent's log)")
            log.warning(
                "break-glass code used",
                extra={
                    "code_id": use.code_id,
                    "grant_id": lease.grant_id,
                    "subject": lease.subject,
                    "action": lease.action,
                    "caller": use.caller,
                    "not_after": rfc3339(lease.not_after),
                },
            )
        self._shared.leases_changed.set()
        self._shared.outbox_changed.set()
        return lease
