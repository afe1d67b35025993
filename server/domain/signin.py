"""Single sign-on: an identity provider's verified claims become a jitmesh user and a
short-lived token. Pure rules here (which claim is the name, which the groups, who may sign in);
the ID token's signature and claims are checked before (server/oidc.py)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from jitmesh import validation as v
from jitmesh.clock import rfc3339

from .errors import InvalidArgument, PermissionDenied, Unauthenticated
from .models import AuditEntry, AuditKind, new_secret, user_name
from .ports import Store


class ManagedBy(enum.StrEnum):
    LOCAL = "local"
    OIDC = "oidc"


@dataclass(frozen=True, slots=True)
class SignInRules:
    username_claim: str = "preferred_username"
    groups_claim: str = "groups"
    token_ttl: timedelta = timedelta(hours=1)
    max_token_ttl: timedelta = timedelta(hours=12)


def identity_from_claims(
    claims: Mapping[str, Any], rules: SignInRules
) -> tuple[str, frozenset[str]]:
    """The canonical (folded) user name and the groups the claims give. A claim that is missing
    or not a valid name refuses the sign-in; groups that are not valid group names are left out
    (an IdP's group list often holds display names)."""
    raw = claims.get(rules.username_claim)
    if not isinstance(raw, str) or not raw.strip():
        raise Unauthenticated(f"the ID token has no {rules.username_claim} claim")
    name = user_name(raw)
    if not v.SUBJECT.fullmatch(name):
        raise Unauthenticated(f"the ID token's {rules.username_claim} is not a valid user name")
    found = claims.get(rules.groups_claim, [])
    if isinstance(found, str):
        found = [found]
    groups = frozenset(
        g for g in (found if isinstance(found, list) else []) if isinstance(g, str)
        and v.GROUP.fullmatch(g)
    )  # fmt: skip
    return name, groups


class SignInService:
    """Turns verified claims into a short-lived token for the user they name."""

    def __init__(self, store: Store, rules: SignInRules) -> None:
        self._store = store
        self._rules = rules

    async def sign_in(
        self,
        claims: Mapping[str, Any],
        issuer: str,
        now: datetime,
        ttl: timedelta | None,
        hash_secret: Any,
    ) -> tuple[str, str, frozenset[str], datetime]:
        """(token, user, groups, expires_at). A user that admins manage locally cannot sign in
        through the IdP (and the IdP never takes over a local user silently); a change of the
        IdP's groups since the last sign-in is audited."""
        name, groups = identity_from_claims(claims, self._rules)
        lifetime = ttl or self._rules.token_ttl
        if lifetime <= timedelta(0):
            raise InvalidArgument("ttl must be positive")
        lifetime = min(lifetime, self._rules.max_token_ttl)
        token = new_secret("jmt")
        expires_at = now + lifetime
        async with self._store.transaction() as tx:
            user = await tx.get_user_record(name)
            if user is not None and user[2] != ManagedBy.OIDC.value:
                await tx.audit(
                    AuditEntry(
                        AuditKind.USER_SIGN_IN_REFUSED, f"oidc:{issuer}", now, subject=name,
                        details={"why": "user is managed locally"},
                    )
                )  # fmt: skip
                refused = True
            else:
                refused = False
                if user is None:
                    await tx.insert_oidc_user(name, groups, now)
                    await tx.audit(
                        AuditEntry(
                            AuditKind.USER_CREATED, f"oidc:{issuer}", now, subject=name,
                            details={"groups": ",".join(sorted(groups)), "managed_by": "oidc"},
                        )
                    )  # fmt: skip
                elif user[0] != groups:
                    await tx.upsert_user(name, groups, now)
                    await tx.audit(
                        AuditEntry(
                            AuditKind.USER_GROUPS_CHANGED, f"oidc:{issuer}", now, subject=name,
                            details={
                                "before": ",".join(sorted(user[0])),
                                "after": ",".join(sorted(groups)),
                                "source": "oidc",
                            },
                        )
                    )  # fmt: skip
                if user is not None and user[1]:
                    raise PermissionDenied(f"user {name} is disabled")
                await tx.insert_token(hash_secret(token), name, now, expires_at, "oidc sign-in")
                await tx.audit(
                    AuditEntry(
                        AuditKind.USER_SIGNED_IN, f"oidc:{issuer}", now, subject=name,
                        details={"expires_at": rfc3339(expires_at), "issuer": issuer},
                    )
                )  # fmt: skip
        if refused:
            raise PermissionDenied(
                f"user {name} is managed locally (groups set by admins), not by the identity "
                "provider; an admin can remove the local user or use another name"
            )
        return token, name, groups, expires_at
