"""The store contract for break-glass codes, on every store: codes round-trip without their
text, a use and a review are each compare-and-set (one of two concurrent uses wins), listings
filter, a grant names the code it was adopted from, and the usable codes are read grouped by
agent and signing key."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

from jitmesh.types import BreakglassCode, GrantState
from server.domain.models import IssuedCode, LiveCodes
from server.domain.ports import Store
from tests.server.helpers import T0, make_grant

CODE = BreakglassCode(
    id="0" * 32,
    agent="db-1",
    subject="alice",
    action="shell",
    duration=timedelta(minutes=30),
    issued_at=T0,
    issued_by="admin",
    expires_at=T0 + timedelta(days=7),
    reason="on-call kit",
)


async def issue(store: Store, *codes: BreakglassCode, key_id: str = "ed25519:k1") -> None:
    async with store.transaction() as tx:
        await tx.insert_breakglass_codes([IssuedCode(c, f"sha-{c.id}", key_id) for c in codes])


async def test_a_code_round_trips(store: Store) -> None:
    await issue(store, CODE)
    async with store.transaction() as tx:
        assert await tx.get_breakglass_code(CODE.id) == CODE
        assert await tx.get_breakglass_code("f" * 32) is None


async def test_a_code_is_used_once_even_concurrently(store: Store) -> None:
    await issue(store, CODE)

    async def use(by: str) -> bool:
        async with store.transaction() as tx:
            return await tx.mark_breakglass_used(
                CODE.id, used_at=T0 + timedelta(hours=1), grant_id=f"bg-{CODE.id}", used_by=by
            )

    results = await asyncio.gather(*(use(f"user{i}") for i in range(5)))
    assert sum(results) == 1
    async with store.transaction() as tx:
        used = await tx.get_breakglass_code(CODE.id)
        assert used is not None
        assert used.used_at == T0 + timedelta(hours=1)
        assert used.grant_id == f"bg-{CODE.id}"
        assert not await tx.mark_breakglass_used(
            "f" * 32, used_at=T0, grant_id="bg-x", used_by="root"
        )


async def test_a_review_needs_a_use_and_happens_once(store: Store) -> None:
    await issue(store, CODE)
    at = T0 + timedelta(hours=2)
    async with store.transaction() as tx:
        assert not await tx.review_breakglass(CODE.id, at=at, by="admin", note="early")
        await tx.mark_breakglass_used(CODE.id, used_at=T0, grant_id="bg-1", used_by="root")
        assert await tx.review_breakglass(CODE.id, at=at, by="admin", note="checked")
        assert not await tx.review_breakglass(CODE.id, at=at, by="carol", note="again")
        reviewed = await tx.get_breakglass_code(CODE.id)
    assert reviewed is not None
    assert (reviewed.reviewed_at, reviewed.reviewed_by, reviewed.review_note) == (
        at,
        "admin",
        "checked",
    )


async def test_listings_filter(store: Store) -> None:
    expired = replace(CODE, id="1" * 32, issued_at=T0 - timedelta(days=9), expires_at=T0)
    other = replace(CODE, id="2" * 32, agent="web-1", subject="bob")
    used = replace(CODE, id="3" * 32, issued_at=T0 + timedelta(seconds=1))
    await issue(store, CODE, expired, other, used)
    async with store.transaction() as tx:
        await tx.mark_breakglass_used(used.id, used_at=T0, grant_id="bg-3", used_by="root")

    async def ids(**how: object) -> list[str]:
        found = await store.list_breakglass_codes(
            unreviewed=bool(how.get("unreviewed", False)),
            agent=str(how.get("agent", "")),
            subject=str(how.get("subject", "")),
            include_expired=bool(how.get("include_expired", False)),
            now=T0 + timedelta(minutes=1),
        )
        return [c.id for c in found]

    # Newest first (then by id), expired unused codes left out.
    assert await ids() == [used.id, other.id, CODE.id]
    assert set(await ids(include_expired=True)) == {CODE.id, expired.id, other.id, used.id}
    assert await ids(unreviewed=True) == [used.id]
    assert await ids(agent="web-1") == [other.id]
    assert await ids(subject="bob") == [other.id]


async def test_a_grant_names_its_code(store: Store) -> None:
    grant = replace(
        make_grant(request_id="", agent="db-1", state=GrantState.ACTIVE),
        id="bg-" + "0" * 32,
        breakglass_code_id="0" * 32,
    )
    async with store.transaction() as tx:
        await tx.insert_grants([grant])
    stored = await store.get_grant(grant.id)
    assert stored is not None
    assert stored.breakglass_code_id == "0" * 32


async def test_usable_codes_are_read_by_agent_and_signing_key(store: Store) -> None:
    day = timedelta(days=1)
    later = replace(CODE, id="1" * 32, issued_at=T0 + day, expires_at=T0 + 9 * day)
    used = replace(CODE, id="2" * 32, expires_at=T0 + 30 * day)
    expired = replace(CODE, id="3" * 32, issued_at=T0 - 9 * day, expires_at=T0 + day)
    other = replace(CODE, id="4" * 32, agent="web-1")
    await issue(store, CODE, later, used, expired, other)
    newer = replace(CODE, id="5" * 32, issued_at=T0 + 2 * day, expires_at=T0 + 3 * day)
    legacy = replace(CODE, id="6" * 32, issued_at=T0 + 3 * day, expires_at=T0 + 4 * day)
    await issue(store, newer, key_id="ed25519:k2")
    await issue(store, legacy, key_id="")
    async with store.transaction() as tx:
        await tx.mark_breakglass_used(used.id, used_at=T0, grant_id="bg-2", used_by="root")

    live = await store.live_breakglass_codes(T0 + day)
    assert sorted(live, key=lambda c: (c.agent, c.key_id)) == [
        LiveCodes("db-1", "", legacy.issued_at, legacy.issued_at, legacy.expires_at),
        LiveCodes("db-1", "ed25519:k1", CODE.issued_at, later.issued_at, later.expires_at),
        LiveCodes("db-1", "ed25519:k2", newer.issued_at, newer.issued_at, newer.expires_at),
        LiveCodes("web-1", "ed25519:k1", other.issued_at, other.issued_at, other.expires_at),
    ]
    assert await store.live_breakglass_codes(T0 + 30 * day) == []
