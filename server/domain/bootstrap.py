"""Credentials the coordinator makes for itself: the bootstrap admin token of `serve` and the
ready-made credentials of `dev` (issue 10, items 3 and I).

Dev mode's credentials (alice's, bob's, carol's and admin's tokens, labelled "dev", and the
reusable join token with which an agent picks its own labels) are for a loopback demo: `serve`
refuses a directory that still holds any of them, and `retire-dev` revokes each, audited. The
bootstrap admin token expires like every other token (24 hours by default) and is replaced with
`rotate-admin-token`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from jitmesh.types import JoinTokenInfo, TokenInfo

from .fleet import FleetService
from .governance import IdentityService, TokenService
from .models import ADMIN_GROUP, Principal
from .ports import Store

DEV_LABEL = "dev"
BOOTSTRAP_LABEL = "bootstrap"
BOOTSTRAP_TTL = timedelta(hours=24)
BOOTSTRAP_USER = "admin"
# Who the audit log names for these local operations (run on the coordinator host, while it is
# stopped: whoever can run them can read the data directory anyway).
RETIRE_ACTOR = Principal("retire-dev", frozenset({ADMIN_GROUP}))
ROTATE_ACTOR = Principal("rotate-admin-token", frozenset({ADMIN_GROUP}))


@dataclass(frozen=True)
class DevCredentials:
    tokens: list[TokenInfo]
    join_tokens: list[JoinTokenInfo]

    def __bool__(self) -> bool:
        return bool(self.tokens or self.join_tokens)

    def describe(self) -> str:
        parts = []
        if self.tokens:
            users = ", ".join(sorted({t.user for t in self.tokens}))
            parts.append(f"ready-made tokens of {users}")
        if self.join_tokens:
            parts.append("a reusable join token (agents enrolled with it pick their own labels)")
        return " and ".join(parts)


async def dev_credentials(store: Store, now: datetime) -> DevCredentials:
    """The live credentials `dev` made in this store."""
    tokens = [
        t
        for t in await store.list_tokens("")
        if t.label == DEV_LABEL
        and t.revoked_at is None
        and (t.expires_at is None or t.expires_at > now)
    ]
    joins = [j for j in await store.list_join_tokens() if j.uses_left is None and j.live(now)]
    return DevCredentials(tokens, joins)


class DevDataError(Exception):
    """`serve` was pointed at a directory made by `dev`."""


def refuse_dev_data(found: DevCredentials, data_dir: str) -> None:
    if found:
        raise DevDataError(
            f"{data_dir} was made by 'jitmesh-coordinator dev' and still holds its "
            f"{found.describe()}; a production coordinator never serves them. Start serve on a "
            f"new, empty --data directory, or retire them first with "
            f"'jitmesh-coordinator retire-dev --data {data_dir}' (revokes and audits each)"
        )


async def retire_dev(
    store: Store, tokens: TokenService, fleet: FleetService, now: datetime
) -> list[str]:
    """Revoke every live dev credential (audited, one entry each); what was retired."""
    found = await dev_credentials(store, now)
    done = []
    for token in found.tokens:
        await tokens.revoke(RETIRE_ACTOR, token.id)
        done.append(f"token {token.id} of {token.user}")
    for join in found.join_tokens:
        await fleet.revoke_join_token(RETIRE_ACTOR, join.id, "dev credentials retired")
        done.append(f"reusable join token {join.id}")
    return done


async def register_bootstrap(
    identity: IdentityService, token: str, ttl: timedelta = BOOTSTRAP_TTL
) -> None:
    """The admin user with this bootstrap token, expiring `ttl` after it is registered (kept as
    it is when the token is registered already: a restart never extends it)."""
    await identity.ensure_user(BOOTSTRAP_USER, [ADMIN_GROUP], token, label=BOOTSTRAP_LABEL, ttl=ttl)


async def bootstrap_expired(store: Store, token_id: str, now: datetime) -> datetime | None:
    """When the bootstrap token with this id expired, if it has (None while it holds)."""
    for info in await store.list_tokens(BOOTSTRAP_USER):
        if info.id == token_id and info.expires_at is not None and info.expires_at <= now:
            return info.expires_at
    return None


async def rotate_bootstrap(
    store: Store,
    identity: IdentityService,
    tokens: TokenService,
    token: str,
    ttl: timedelta = BOOTSTRAP_TTL,
) -> list[str]:
    """Revoke every live bootstrap token and register `token` in their place; the ids revoked."""
    revoked = []
    for info in await store.list_tokens(BOOTSTRAP_USER):
        if info.label == BOOTSTRAP_LABEL and info.revoked_at is None:
            await tokens.revoke(ROTATE_ACTOR, info.id)
            revoked.append(info.id)
    await register_bootstrap(identity, token, ttl)
    return revoked
