"""The identity generation, on every store: any change to users, operator tokens or revoked
certificates moves it, whichever process commits it; what `IdentityService` remembers of a
credential is forgotten when it moves, so a revoke or disable made through one replica (or
another store on the same SQLite file) refuses the very next call on another."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import pytest

from server.domain.access import hash_secret
from server.domain.errors import Unauthenticated
from server.domain.governance import IdentityService, PolicyService, StoreVersions
from server.domain.hub import Hub
from server.domain.models import AuditEntry, ObservedKind, Scope
from server.domain.policy import DEV_POLICY
from server.domain.ports import Store
from tests.server.helpers import T0
from tests.store.conftest import Opener


class _Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at


def _identity(store: Store, clock: _Clock | None = None) -> IdentityService:
    return IdentityService(store, Hub(), clock or _Clock(T0))  # type: ignore[arg-type]


async def test_every_change_to_users_tokens_and_certificates_moves_the_generation(
    store: Store,
) -> None:
    seen = [await store.identity_generation()]

    async def moved() -> None:
        now = await store.identity_generation()
        assert now != seen[-1]
        seen.append(now)

    async with store.transaction() as tx:
        await tx.upsert_user("alice", ["developers"], T0)
    await moved()
    async with store.transaction() as tx:
        await tx.upsert_user("alice", ["developers", "sre"], T0)
    await moved()
    async with store.transaction() as tx:
        await tx.insert_oidc_user("carol", ["sre"], T0)
    await moved()
    async with store.transaction() as tx:
        await tx.insert_token(hash_secret("jmt_a"), "alice", T0, None, "")
    await moved()
    async with store.transaction() as tx:
        assert await tx.revoke_token(hash_secret("jmt_a")[:16], T0)
    await moved()
    async with store.transaction() as tx:
        assert await tx.set_user_disabled("alice", True)
    await moved()
    async with store.transaction() as tx:
        assert await tx.revoke_certificate("1f", T0, "admin", "lost")
    await moved()
    # Other writes leave it alone.
    async with store.transaction() as tx:
        await tx.set_meta("something", "else")
        await tx.audit(AuditEntry(ObservedKind("test.event"), "admin", T0))
    assert await store.identity_generation() == seen[-1]


async def test_token_holder_names_the_user_and_the_expiry(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.upsert_user("alice", ["developers"], T0)
        await tx.insert_token(hash_secret("jmt_a"), "alice", T0, T0 + timedelta(hours=1), "")
        await tx.insert_token(hash_secret("jmt_b"), "alice", T0, None, "")
    holder = await store.token_holder(hash_secret("jmt_a"))
    assert holder is not None
    assert holder[0].name == "alice"
    assert holder[0].groups == {"developers"}
    assert holder[1] == T0 + timedelta(hours=1)
    assert await store.token_holder(hash_secret("jmt_b")) == (holder[0], None)
    assert await store.token_holder(hash_secret("jmt_unknown")) is None


async def test_a_scoped_token_keeps_its_scopes_when_remembered(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.upsert_user("bridge", [], T0)
        await tx.insert_token(
            hash_secret("jmt_bridge"), "bridge", T0, None, "", [Scope.REVIEW_ON_BEHALF]
        )
    identity = _identity(store)
    for _ in range(2):  # looked up, then remembered
        assert (await identity.authenticate("jmt_bridge")).scopes == {"review-on-behalf"}


@pytest.mark.parametrize("change", ["revoke token", "disable user", "delete token"])
async def test_a_change_on_another_replica_refuses_the_next_call(
    store: Store, reopen: Opener, change: str
) -> None:
    other = await reopen()  # a second replica (PostgreSQL) or a second store on the file
    async with store.transaction() as tx:
        await tx.upsert_user("alice", ["developers"], T0)
        await tx.insert_token(hash_secret("jmt_alice"), "alice", T0, None, "")
    identity = _identity(store)
    for _ in range(3):  # remembered after the first call
        assert (await identity.authenticate("jmt_alice")).name == "alice"
    async with other.transaction() as tx:
        if change == "revoke token":
            assert await tx.revoke_token(hash_secret("jmt_alice")[:16], T0)
        elif change == "disable user":
            assert await tx.set_user_disabled("alice", True)
        else:
            # Not a store method: whatever writes the table, the trigger moves the generation.
            sql = (
                "DELETE FROM tokens WHERE hash = ?"
                if type(other).__name__ == "SqliteStore"
                else "DELETE FROM tokens WHERE hash = %s"
            )
            await tx._conn.execute(sql, [hash_secret("jmt_alice")])  # type: ignore[attr-defined]
    with pytest.raises(Unauthenticated):
        await identity.authenticate("jmt_alice")


async def test_a_new_group_is_in_force_at_the_next_call(store: Store, reopen: Opener) -> None:
    other = await reopen()
    async with store.transaction() as tx:
        await tx.upsert_user("alice", ["developers"], T0)
        await tx.insert_token(hash_secret("jmt_alice"), "alice", T0, None, "")
    identity = _identity(store)
    assert (await identity.authenticate("jmt_alice")).groups == {"developers"}
    async with other.transaction() as tx:
        await tx.upsert_user("alice", [], T0)
    assert (await identity.authenticate("jmt_alice")).groups == frozenset()


async def test_a_remembered_token_still_expires_on_time(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.upsert_user("alice", ["developers"], T0)
        await tx.insert_token(hash_secret("jmt_alice"), "alice", T0, T0 + timedelta(hours=1), "")
    clock = _Clock(T0)
    identity = _identity(store, clock)
    assert (await identity.authenticate("jmt_alice")).name == "alice"
    clock.at = T0 + timedelta(hours=1)
    with pytest.raises(Unauthenticated):
        await identity.authenticate("jmt_alice")


async def test_a_certificate_revoked_or_its_user_disabled_on_another_replica(
    store: Store, reopen: Opener
) -> None:
    other = await reopen()
    async with store.transaction() as tx:
        await tx.upsert_user("alice", ["developers"], T0)
        await tx.upsert_user("bob", ["sre"], T0)
    identity = _identity(store)
    assert (await identity.authenticate_user("alice", 0x1F)).name == "alice"
    assert (await identity.authenticate_user("bob", 0x2F)).name == "bob"
    async with other.transaction() as tx:
        assert await tx.revoke_certificate("1f", T0, "admin", "lost")
    with pytest.raises(Unauthenticated):
        await identity.authenticate_user("alice", 0x1F)
    assert (await identity.authenticate_user("bob", 0x2F)).name == "bob"
    async with other.transaction() as tx:
        assert await tx.set_user_disabled("bob", True)
    with pytest.raises(Unauthenticated):
        await identity.authenticate_user("bob", 0x2F)


async def test_an_unknown_token_is_never_remembered(store: Store) -> None:
    identity = _identity(store)
    with pytest.raises(Unauthenticated):
        await identity.authenticate("jmt_later")
    async with store.transaction() as tx:
        await tx.upsert_user("alice", ["developers"], T0)
        await tx.insert_token(hash_secret("jmt_later"), "alice", T0, None, "")
    assert (await identity.authenticate("jmt_later")).name == "alice"


class _CountedReads:
    """The store, with its identity-generation reads counted; with `hold` set, each read (once
    it has read) waits for `release`, so a test can act while a read is under way."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.reads = 0
        self.hold = False
        self.reading = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def identity_generation(self) -> int:
        self.reads += 1
        generation = await self._store.identity_generation()
        await self._held()
        return generation

    async def versions(self) -> tuple[int, int]:
        self.reads += 1
        versions: tuple[int, int] = await self._store.versions()
        await self._held()
        return versions

    async def _held(self) -> None:
        if self.hold:
            self.reading.set()
            await self.release.wait()


async def _alice(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.upsert_user("alice", ["developers"], T0)
        await tx.insert_token(hash_secret("jmt_alice"), "alice", T0, None, "")


async def test_calls_that_arrive_together_share_one_read(store: Store) -> None:
    await _alice(store)
    counted = _CountedReads(store)
    identity = _identity(counted)
    assert (await identity.authenticate("jmt_alice")).name == "alice"
    counted.reads = 0
    calls = [identity.authenticate("jmt_alice") for _ in range(20)]
    assert {p.name for p in await asyncio.gather(*calls)} == {"alice"}
    assert counted.reads == 1


@pytest.mark.parametrize("shared", ["generation alone", "with the policy version"])
async def test_a_call_arriving_during_a_read_waits_for_the_next_one(
    store: Store, reopen: Opener, shared: str
) -> None:
    """Revoked while the first call's read is under way: that call may still pass (it arrived
    before the revoke), the second must not (a read it shared would predate its arrival)."""
    other = await reopen()
    await _alice(store)
    counted = _CountedReads(store)
    versions = StoreVersions(counted) if shared == "with the policy version" else None
    identity = IdentityService(counted, Hub(), _Clock(T0), versions)  # type: ignore[arg-type]
    assert (await identity.authenticate("jmt_alice")).name == "alice"  # remembered
    counted.hold = True
    first = asyncio.create_task(identity.authenticate("jmt_alice"))
    async with asyncio.timeout(10):
        await counted.reading.wait()
    async with other.transaction() as tx:
        assert await tx.revoke_token(hash_secret("jmt_alice")[:16], T0)
    waiting: list[int] = []

    def release() -> None:
        waiting.append(identity.reads_waiting)
        counted.release.set()

    second = asyncio.create_task(identity.authenticate("jmt_alice"))
    # Callbacks run in the order scheduled: the read is let go after the second call's first
    # step, where it asks for its read.
    asyncio.get_running_loop().call_soon(release)
    async with asyncio.timeout(10):
        assert (await first).name == "alice"
        with pytest.raises(Unauthenticated):
            await second
    assert waiting == [2]
    assert counted.reads == 3


async def test_versions_reads_the_generation_and_the_policy_version(store: Store) -> None:
    assert await store.versions() == (
        await store.identity_generation(),
        await store.policy_version(),
    )
    async with store.transaction() as tx:
        await tx.upsert_user("alice", ["developers"], T0)
        await tx.insert_policy(DEV_POLICY, "sha-1", T0, "admin")
    generation, version = await store.versions()
    assert generation == await store.identity_generation() != 0
    assert version == await store.policy_version() == 1


async def test_identity_and_policy_checks_that_arrive_together_share_one_read(
    store: Store, reopen: Opener
) -> None:
    """Replicas: who the callers are and whether another replica applied a policy, for calls
    that arrive together, from one read; a policy applied elsewhere is in force at the next."""
    await _alice(store)
    counted = _CountedReads(store)
    versions = StoreVersions(counted)
    identity = IdentityService(counted, Hub(), _Clock(T0), versions)  # type: ignore[arg-type]
    policy = await PolicyService.load(
        counted,
        Hub(),
        _Clock(T0),  # type: ignore[arg-type]
        DEV_POLICY,
        versions=versions,
    )
    assert (await identity.authenticate("jmt_alice")).name == "alice"
    counted.reads = 0
    callers, policies = await asyncio.gather(
        asyncio.gather(*(identity.authenticate("jmt_alice") for _ in range(5))),
        asyncio.gather(*(policy.refresh() for _ in range(5))),
    )
    assert counted.reads == 1
    assert {p.name for p in callers} == {"alice"}
    assert {p.version for p in policies} == {1}
    other = await reopen()
    async with other.transaction() as tx:
        await tx.insert_policy(DEV_POLICY, "sha-2", T0, "admin")
    assert (await policy.refresh()).version == 2
    assert counted.reads == 2
