"""Single sign-on against a real OpenID Connect provider (npm's oidc-provider 8.x): the
coordinator checks the ID token itself and answers with a short-lived jitmesh token."""

from __future__ import annotations

import secrets
from datetime import timedelta
from pathlib import Path

import pytest

from jitmesh.client import Client
from jitmesh.clock import FakeClock
from jitmesh.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from server.app import Coordinator
from tests.oidc.conftest import ACCOUNTS
from tests.oidc.provider import CLIENT_ID, Provider, id_token_for
from tests.server.helpers import TOKENS


async def connect(coordinator: Coordinator, token: str | None = None) -> Client:
    return await Client.connect(f"127.0.0.1:{coordinator.port}", token=token)


async def audit_kinds(coordinator: Coordinator, subject: str) -> list[tuple[str, str]]:
    events = await coordinator.store.list_audit(
        since=None, agent="", subject=subject, kind="", grant_id="", request_id="",
        after_seq=0, limit=100,
    )  # fmt: skip
    return [(e.kind, e.actor) for e in events]


async def test_an_id_token_becomes_a_short_lived_token_for_the_folded_name(
    coordinator: Coordinator, provider: Provider
) -> None:
    nonce = secrets.token_urlsafe(16)
    id_token = await id_token_for(provider, "Bob", nonce=nonce)
    async with await connect(coordinator) as anonymous:
        config = await anonymous.sign_in_config()
        assert (config.issuer, config.client_id) == (provider.issuer, CLIENT_ID)
        token, info = await anonymous.exchange_id_token(id_token, nonce=nonce)
    assert info.user == "bob"  # "Bob" at the IdP is the one user bob here
    assert info.expires_at is not None
    assert info.created_at is not None
    assert info.expires_at - info.created_at == timedelta(hours=1)
    groups = await coordinator.store.user_groups("bob")
    assert groups == frozenset({"sre"})  # "Not A Group!" is no group name: left out
    async with await connect(coordinator, token) as bob:
        assert await bob.list_requests() == []
    assert ("user.signed_in", f"oidc:{provider.issuer}") in await audit_kinds(coordinator, "bob")


async def test_groups_come_from_the_provider_at_each_sign_in_and_changes_are_audited(
    coordinator: Coordinator, provider: Provider
) -> None:
    async with await connect(coordinator) as anonymous:
        nonce = secrets.token_urlsafe(16)
        await anonymous.exchange_id_token(
            await id_token_for(provider, "carol", nonce=nonce), nonce=nonce
        )
        provider.accounts["carol"]["groups"] = ["developers"]
        provider.save()
        nonce = secrets.token_urlsafe(16)
        await anonymous.exchange_id_token(
            await id_token_for(provider, "carol", nonce=nonce), nonce=nonce
        )
    assert await coordinator.store.user_groups("carol") == frozenset({"developers"})
    events = await coordinator.store.list_audit(
        since=None, agent="", subject="carol", kind="user.groups_changed", grant_id="",
        request_id="", after_seq=0, limit=10,
    )  # fmt: skip
    assert [(e.details["before"], e.details["after"]) for e in events] == [("sre", "developers")]


async def test_a_local_user_is_never_taken_over_by_the_provider(
    coordinator: Coordinator, provider: Provider
) -> None:
    await coordinator.identity.ensure_user("alice", ["admins"], TOKENS["alice"])
    nonce = secrets.token_urlsafe(16)
    id_token = await id_token_for(provider, "alice", nonce=nonce)
    async with await connect(coordinator) as anonymous:
        with pytest.raises(PermissionDeniedError, match="managed locally"):
            await anonymous.exchange_id_token(id_token, nonce=nonce)
    assert await coordinator.store.user_groups("alice") == frozenset({"admins"})
    assert ("user.sign_in_refused", f"oidc:{provider.issuer}") in await audit_kinds(
        coordinator, "alice"
    )


async def test_expired_replayed_and_foreign_id_tokens_are_refused(
    coordinator: Coordinator, provider: Provider, clock: FakeClock, tmp_path: Path
) -> None:
    nonce = secrets.token_urlsafe(16)
    id_token = await id_token_for(provider, "alice", nonce=nonce)
    other = Provider(tmp_path / "other-idp", {k: dict(v) for k, v in ACCOUNTS.items()}).start()
    try:
        foreign = await id_token_for(other, "alice", nonce=nonce)
    finally:
        other.stop()
    async with await connect(coordinator) as anonymous:
        with pytest.raises(AuthenticationError, match="nonce"):
            await anonymous.exchange_id_token(id_token, nonce="another-nonce")
        with pytest.raises(AuthenticationError, match=r"signature|iss"):
            await anonymous.exchange_id_token(foreign, nonce=nonce)
        with pytest.raises(AuthenticationError, match="not an ID token"):
            await anonymous.exchange_id_token("eyJ.bad", nonce=nonce)
        tampered = id_token.rsplit(".", 1)[0] + "." + "A" * 20
        with pytest.raises(AuthenticationError, match="signature"):
            await anonymous.exchange_id_token(tampered, nonce=nonce)
        await clock.advance(timedelta(hours=2))
        with pytest.raises(AuthenticationError, match="expired"):
            await anonymous.exchange_id_token(id_token, nonce=nonce)
    assert await coordinator.store.user_groups("alice") is None  # nobody was created


async def test_new_provider_keys_are_fetched_when_a_token_names_one(
    coordinator: Coordinator, provider: Provider, clock: FakeClock
) -> None:
    async with await connect(coordinator) as anonymous:
        nonce = secrets.token_urlsafe(16)
        await anonymous.exchange_id_token(
            await id_token_for(provider, "carol", nonce=nonce), nonce=nonce
        )
        provider.stop()
        provider.start(new_keys=True)  # same issuer (port), rotated signing key
        # Keys are fetched again on an unknown key id, at most every 30 s (a flood of forged
        # tokens does not become a flood of fetches).
        await clock.advance(timedelta(seconds=31))
        nonce = secrets.token_urlsafe(16)
        _token, info = await anonymous.exchange_id_token(
            await id_token_for(provider, "carol", nonce=nonce), nonce=nonce
        )
    assert info.user == "carol"


async def test_without_single_sign_on_the_calls_say_so(tmp_path: Path) -> None:
    from server.app import build
    from server.config import CoordinatorConfig

    plain = await build(CoordinatorConfig(data_dir=tmp_path / "plain", port=0))
    try:
        async with await connect(plain) as anonymous:
            with pytest.raises(NotFoundError, match="single sign-on is not configured"):
                await anonymous.sign_in_config()
    finally:
        await plain.stop()


async def test_admins_do_not_change_a_provider_managed_user_on_the_side(
    coordinator: Coordinator, provider: Provider
) -> None:
    from jitmesh.errors import InvalidArgumentError

    await coordinator.identity.ensure_user("admin", ["admins"], TOKENS["admin"])
    nonce = secrets.token_urlsafe(16)
    async with await connect(coordinator) as anonymous:
        await anonymous.exchange_id_token(
            await id_token_for(provider, "carol", nonce=nonce), nonce=nonce
        )
    async with await connect(coordinator, TOKENS["admin"]) as admin:
        with pytest.raises(InvalidArgumentError, match="identity provider"):
            await admin.set_user_groups("carol", ["admins"], reason="promote")
        with pytest.raises(InvalidArgumentError, match="identity provider"):
            await admin.create_token("carol")
    assert await coordinator.store.user_groups("carol") == frozenset({"sre"})
