"""A writer cancelled at any point of its transaction (as a gRPC handler is when its client
cancels) leaves the store usable: no transaction left open behind the lock, no commit without the
audit head moving. A client opening and cancelling streams used to wedge every later write."""

from __future__ import annotations

import asyncio
import contextlib

from server.domain.audit import verify_chain
from server.domain.models import AuditEntry, ObservedKind
from server.domain.ports import Store
from tests.server.helpers import T0


async def test_a_writer_cancelled_anywhere_leaves_the_store_usable(store: Store) -> None:
    started = 0
    for steps in range(40):
        entered = asyncio.Event()

        async def write(n: int, entered: asyncio.Event) -> None:
            nonlocal started
            started += 1
            entered.set()
            async with store.transaction() as tx:
                await tx.audit(
                    AuditEntry(ObservedKind("test.write"), "t", T0, details={"n": str(n)})
                )
                await tx.audit(
                    AuditEntry(ObservedKind("test.write"), "t", T0, details={"n": str(n)})
                )

        task = asyncio.create_task(write(steps, entered))
        await entered.wait()
        # Cancel after a different number of loop turns each time: before BEGIN, during it,
        # between statements, during COMMIT, or after the end.
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # The next writer is never refused and continues the chain from the committed head.
        async with asyncio.timeout(10), store.transaction() as tx:
            await tx.audit(AuditEntry(ObservedKind("test.after"), "t", T0))
    assert started == 40
    chain = await store.audit_chain(0, 1000)
    assert verify_chain(chain).ok
    assert [e.seq for e in chain] == list(range(1, len(chain) + 1))
    assert len([e for e in chain if e.kind == "test.after"]) == 40
    # Each cancelled writer committed both of its events or neither.
    counts: dict[str, int] = {}
    for event in chain:
        if event.kind == "test.write":
            counts[event.details["n"]] = counts.get(event.details["n"], 0) + 1
    assert set(counts.values()) <= {2}
