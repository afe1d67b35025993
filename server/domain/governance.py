"""Identity (operator tokens), the running policy, and the audit log's read side."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from jitmesh import validation as v
from jitmesh.clock import Clock, rfc3339
from jitmesh.durations import format_duration
from jitmesh.types import (
    AuditEvent,
    ChainVerification,
    PolicyDecision,
    PolicyDocument,
    Request,
    RequestState,
    TokenInfo,
    UserInfo,
)

from .access import hash_secret
from .approval import DAY, auto_decision, budget_usage
from .audit import ChainVerifier
from .batching import GroupCommit
from .errors import (
    Conflict,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    UserDisabled,
    invalid_input,
)
from .hub import Hub
from .models import (
    ADMIN_GROUP,
    AuditEntry,
    AuditKind,
    Principal,
    Scope,
    new_secret,
    same_person,
    user_name,
)
from .policy import Policy, decision, match, parse_policy, plan_for
from .ports import Store, Tx
from .reads import Readers

VERIFY_PAGE = 5000


# Credentials remembered at most; past it the cache starts again (a flood of distinct tokens
# cannot grow the coordinator's memory).
MAX_KNOWN = 10_000
# Callers answered by one shared read at most (a burst larger than this takes a few reads).
SHARED_READ_BATCH = 10_000


class StoreVersions:
    """The identity generation and the policy version, read together by one statement
    (`Store.versions`) and shared by every call that asked before the read started. Replicas
    check both on their calls (who the caller is; whether another replica applied a policy),
    and on PostgreSQL each read alone is a round trip: with this, the calls that arrive
    together make one read between them, whichever of the two each wants."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._reads = GroupCommit(self._read, SHARED_READ_BATCH)

    @property
    def waiting(self) -> int:
        """Calls waiting for a read (for tests)."""
        return self._reads.waiting

    async def read(self) -> tuple[int, int]:
        """(identity generation, policy version), from a read that started after this call."""
        return await self._reads.submit(None)

    async def _read(self, callers: Sequence[None]) -> list[tuple[int, int]]:
        versions = await self._store.versions()
        return [versions] * len(callers)


class IdentityService:
    """Who a credential stands for. What a token or certificate stood for is remembered while
    the store's identity generation stays the same: every change to users, tokens or revoked
    certificates moves it (a trigger, on every replica's commits), and it is read on every
    call, so a revoked token, a disabled user or a revoked certificate is refused at the very
    next call, on every replica, without looking the credential up each time."""

    def __init__(
        self,
        store: Store,
        hub: Hub,
        clock: Clock,
        versions: StoreVersions | None = None,
        *,
        shared_reads: bool = True,
    ) -> None:
        """`versions` (replicas): the generation comes with the policy version, one read for
        both (`StoreVersions`); without it, from a read of the generation alone, shared by the
        calls that asked before it started unless `shared_reads` is False: for a store that
        answers on the event loop without waiting (SQLite, one inline statement), where sharing
        would only add a task and two turns of the loop to every call."""
        self._store = store
        self._hub = hub
        self._clock = clock
        self._versions = versions
        self._shared_reads = shared_reads
        self._generation = -1
        # token hash -> (principal, expires_at); (user, serial) -> principal.
        self._tokens: dict[str, tuple[Principal, datetime | None]] = {}
        self._users: dict[tuple[str, str], Principal] = {}
        # One read of the generation for all the calls that asked before it started (a read
        # per loop turn under load, not one per call). Each call's read still starts after the
        # call arrived, so "refused at the very next call" holds: a call that arrives while a
        # read is under way waits for the next one.
        self._generations = GroupCommit(self._read_generation, SHARED_READ_BATCH)

    @property
    def reads_waiting(self) -> int:
        """Calls waiting for a read of the identity generation (for tests)."""
        if self._versions is not None:
            return self._versions.waiting
        return self._generations.waiting

    async def _read_generation(self, callers: Sequence[None]) -> list[int]:
        generation = await self._store.identity_generation()
        return [generation] * len(callers)

    async def _current(self) -> None:
        """Forget everything remembered when the identity generation moved."""
        if self._versions is not None:
            generation, _ = await self._versions.read()
        elif self._shared_reads:
            generation = await self._generations.submit(None)
        else:
            generation = await self._store.identity_generation()
        if generation != self._generation:
            self._tokens.clear()
            self._users.clear()
            self._generation = generation

    async def authenticate(self, token: str) -> Principal:
        """A revoked token or disabled user is refused at once (see the class)."""
        if not token or len(token) > 512:
            raise Unauthenticated("missing or malformed bearer token")
        # The generation is read before the look-up: a change committed after this read moves
        # it again, so what the look-up saw is never kept past the next call.
        await self._current()
        generation = self._generation
        token_hash = hash_secret(token)
        now = self._clock.now()
        known = self._tokens.get(token_hash)
        if known is None:
            known = await self._store.token_holder(token_hash)
            if known is None:
                await self._refuse(token_hash, now)
            assert known is not None
            if self._generation == generation:
                if len(self._tokens) >= MAX_KNOWN:
                    self._tokens.clear()
                self._tokens[token_hash] = known
        principal, expires_at = known
        if expires_at is not None and expires_at <= now:
            await self._refuse(token_hash, now)
        return principal

    async def _refuse(self, token_hash: str, now: datetime) -> None:
        """Why the token is refused, told only to whoever holds it (its hash is the key)."""
        why, user = await self._store.token_refusal(token_hash, now)
        if why == "disabled":
            raise UserDisabled(
                f"user {user} is disabled: an admin enables it again with "
                f"'jitctl user enable {user}'"
            )
        if why == "expired":
            raise Unauthenticated(
                "bearer token has expired: get a new one (jitctl login, or an admin's "
                "'jitctl token create')"
            )
        if why == "revoked":
            raise Unauthenticated("bearer token was revoked: get a new one")
        raise Unauthenticated("bearer token is not valid")

    async def authenticate_user(self, name: str, serial: int) -> Principal:
        """An operator identified by a client certificate: a disabled (or deleted) user, or a
        revoked certificate, is refused at once (see the class)."""
        await self._current()
        generation = self._generation
        key = (user_name(name), f"{serial:x}")
        principal = self._users.get(key)
        if principal is None:
            principal = await self._store.principal_for_user(*key)
            if principal is None:
                raise Unauthenticated("client certificate names no enabled user, or was revoked")
            if self._generation == generation:
                if len(self._users) >= MAX_KNOWN:
                    self._users.clear()
                self._users[key] = principal
        return principal

    async def acting_for(self, delegate: Principal, user: str) -> Principal:
        """The enabled user `user` as relayed by `delegate`: that user's own name and groups
        (looked up now, so a disabled or unknown user acts for nobody), audited as
        "user via delegate". Whether the delegate may relay at all is the caller's check."""
        with invalid_input():
            name = v.check(v.SUBJECT, user_name(user), "on_behalf_of")
        if same_person(name, delegate.name):
            # A delegate only relays others: as itself it is refused everywhere (operator()).
            raise PermissionDenied("a delegate never acts on behalf of itself")
        found = await self._store.principal_for_user(name, "")
        if found is None:
            raise PermissionDenied(f"{name} is not an enabled jitmesh user")
        return Principal(found.name, found.groups, via=delegate.name)

    async def ensure_user(
        self,
        name: str,
        groups: Iterable[str],
        token: str,
        *,
        label: str = "",
        ttl: timedelta | None = None,
    ) -> None:
        """Create or update a user and register a bearer token for it, expiring `ttl` after its
        creation (idempotent: a token registered already keeps its expiry). Both times come from
        one clock read, so the lifetime is exactly `ttl`."""
        name = v.check(v.SUBJECT, user_name(name), "user name")
        now = self._clock.now()
        expires_at = now + ttl if ttl is not None else None
        async with self._store.transaction() as tx:
            await tx.upsert_user(name, groups, now)
            if not await tx.insert_token(hash_secret(token), name, now, expires_at, label):
                return
            await tx.audit(
                AuditEntry(
                    AuditKind.USER_TOKEN_REGISTERED,
                    "coordinator",
                    now,
                    subject=name,
                    details={"groups": ",".join(sorted(groups)), "label": label},
                )
            )
        await self._hub.audit_written(tx.new_audit)


TOKEN_TTL = timedelta(days=30)
MAX_TOKEN_TTL = timedelta(days=365)
TOKEN_ID = re.compile(r"[0-9a-f]{16}")


class TokenService:
    """Operator bearer tokens, for admins: create (shown once, stored hashed, always expiring),
    list (never the token), revoke, and disable or enable users."""

    def __init__(self, store: Store, hub: Hub, clock: Clock) -> None:
        self._store = store
        self._hub = hub
        self._clock = clock

    async def whoami(self, principal: Principal) -> UserInfo:
        """The caller's own user (any authenticated caller)."""
        found = await self._store.get_user(principal.name)
        if found is not None:
            return found
        # An operator known only by a client certificate's name.
        return UserInfo(principal.name, tuple(sorted(principal.groups)), False, self._clock.now())

    async def create(
        self,
        principal: Principal,
        user: str,
        groups: list[str],
        ttl: timedelta | None,
        label: str,
        scopes: Sequence[str] = (),
    ) -> tuple[str, TokenInfo]:
        _require_admin(principal)
        with invalid_input():
            user = v.check(v.SUBJECT, user_name(user), "user")
            for group in groups:
                v.check(v.GROUP, group, "group")
            v.check_reason(label, field="label")
        known = {s.value for s in Scope}
        for scope in scopes:
            if scope not in known:
                raise InvalidArgument(f"unknown scope (known: {', '.join(sorted(known))})")
        if len(label) > 128:
            raise InvalidArgument("label is longer than 128 characters")
        ttl = TOKEN_TTL if ttl is None else ttl
        if not timedelta(minutes=1) <= ttl <= MAX_TOKEN_TTL:
            raise InvalidArgument("ttl must be between 1m and 365d")
        now = self._clock.now()
        token = new_secret("jmt")
        existing = await self._store.user_groups(user)
        if existing is not None:
            _refuse_if_oidc(await self._store.get_user(user))
        if existing is not None and groups and frozenset(groups) != existing:
            # Tokens issued earlier would silently gain (or lose) the new groups.
            have = ", ".join(sorted(existing)) or "none"
            raise InvalidArgument(
                f"user {user} exists with groups {have}: a token never changes a user's groups; "
                f"change them with 'jitctl user set-groups {user} --group ...' (audited), or "
                "leave --group out"
            )
        async with self._store.transaction() as tx:
            if existing is None:
                if not groups:
                    raise InvalidArgument("a new user needs at least one group (--group)")
                await tx.upsert_user(user, groups, now)
            await tx.insert_token(hash_secret(token), user, now, now + ttl, label, scopes)
            await tx.audit(
                AuditEntry(
                    AuditKind.USER_TOKEN_CREATED,
                    principal.name,
                    now,
                    subject=user,
                    details={
                        "id": hash_secret(token)[:16],
                        "expires_at": rfc3339(now + ttl),
                        "groups": ",".join(sorted(groups)),
                        **({"scopes": ",".join(sorted(set(scopes)))} if scopes else {}),
                    },
                )
            )
        await self._hub.audit_written(tx.new_audit)
        info = TokenInfo(
            hash_secret(token)[:16], user, label, now, now + ttl, None,
            scopes=tuple(sorted(set(scopes))),
        )  # fmt: skip
        return token, info

    async def list(self, principal: Principal, user: str) -> list[TokenInfo]:
        _require_admin(principal)
        user = user_name(user)
        if user and not v.SUBJECT.fullmatch(user):
            raise InvalidArgument("user is not valid")
        return await self._store.list_tokens(user)

    async def revoke(self, principal: Principal, token_id: str) -> None:
        _require_admin(principal)
        now = self._clock.now()
        async with self._store.transaction() as tx:
            if not TOKEN_ID.fullmatch(token_id) or not await tx.revoke_token(token_id, now):
                raise NotFound("no such live token")
            await tx.audit(
                AuditEntry(
                    AuditKind.USER_TOKEN_REVOKED, principal.name, now, details={"id": token_id}
                )
            )
        await self._hub.audit_written(tx.new_audit)

    async def set_groups(
        self, principal: Principal, user: str, groups: Sequence[str], reason: str
    ) -> UserInfo:
        """Replace a user's groups: the one way they change (tokens and certificates of the
        user carry the new groups from their next call on). Audited with before and after."""
        _require_admin(principal)
        with invalid_input():
            user = v.check(v.SUBJECT, user_name(user), "user")
            for group in groups:
                v.check(v.GROUP, group, "group")
            v.check_reason(reason)
        if not groups:
            raise InvalidArgument("a user needs at least one group (to lock a user out: disable)")
        if same_person(user, principal.name) and ADMIN_GROUP not in groups:
            raise InvalidArgument("admins cannot take themselves out of the admins group")
        now = self._clock.now()
        before = await self._store.user_groups(user)
        if before is None:
            raise NotFound(f"no such user {user} (a user is made by its first token)")
        _refuse_if_oidc(await self._store.get_user(user))
        async with self._store.transaction() as tx:
            await tx.upsert_user(user, groups, now)
            await tx.audit(
                AuditEntry(
                    AuditKind.USER_GROUPS_CHANGED,
                    principal.name,
                    now,
                    subject=user,
                    details={
                        "before": ",".join(sorted(before)),
                        "after": ",".join(sorted(set(groups))),
                        "reason": reason[:256],
                    },
                )
            )
        await self._hub.audit_written(tx.new_audit)
        info = await self._store.get_user(user)
        if info is None:
            raise NotFound(f"no such user {user}")
        return info

    async def set_disabled(self, principal: Principal, user: str, disabled: bool) -> None:
        _require_admin(principal)
        user = user_name(user)
        if same_person(user, principal.name) and disabled:
            raise InvalidArgument("admins cannot disable themselves")
        now = self._clock.now()
        async with self._store.transaction() as tx:
            if not v.SUBJECT.fullmatch(user) or not await tx.set_user_disabled(user, disabled):
                raise NotFound("no such user")
            kind = AuditKind.USER_DISABLED if disabled else AuditKind.USER_ENABLED
            await tx.audit(AuditEntry(kind, principal.name, now, subject=user))
        await self._hub.audit_written(tx.new_audit)

    async def revoke_certificate(self, principal: Principal, serial: str, reason: str) -> str:
        """Refuse an operator client certificate from its next call on; the serial as stored
        (lower-case hex). Agents' certificates are retired by removal or re-enrollment."""
        _require_admin(principal)
        canonical = certificate_serial(serial)
        with invalid_input():
            v.check_reason(reason)
        now = self._clock.now()
        async with self._store.transaction() as tx:
            if not await tx.revoke_certificate(canonical, now, principal.name, reason):
                raise Conflict("this certificate is already revoked")
            await tx.audit(
                AuditEntry(
                    AuditKind.USER_CERTIFICATE_REVOKED,
                    principal.name,
                    now,
                    details={"serial": canonical, "reason": reason[:256]},
                )
            )
        await self._hub.audit_written(tx.new_audit)
        return canonical


SERIAL = re.compile(r"(0x)?[0-9a-f]{1,40}")


def certificate_serial(text: str) -> str:
    """A certificate serial number as typed (hex, any case, with or without colons or 0x) in
    the one spelling the store keeps: lower-case hex without leading zeros."""
    compact = text.strip().replace(":", "").lower()
    if not SERIAL.fullmatch(compact):
        raise InvalidArgument("serial is not valid (expected up to 40 hexadecimal digits)")
    return f"{int(compact.removeprefix('0x'), 16):x}"


def _refuse_if_oidc(user: UserInfo | None) -> None:
    """Users who sign in through the identity provider get their groups (and tokens) from it:
    admins never change them on the side (issue 13: never both, silently)."""
    if user is not None and user.managed_by == "oidc":
        raise InvalidArgument(
            f"user {user.name} signs in through the identity provider, which sets its groups at "
            "each sign-in (and its tokens come from jitctl login): change them there"
        )


def _require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise PermissionDenied("this needs the admins group")


class PolicyService:
    """Holds the running policy. A new document is validated first and swapped in atomically;
    a bad one leaves the running policy in force."""

    def __init__(
        self,
        store: Store,
        hub: Hub,
        clock: Clock,
        policy: Policy,
        versions: StoreVersions | None = None,
    ) -> None:
        """`versions` (replicas): `refresh` reads the policy version with the identity
        generation, one read for both (`StoreVersions`)."""
        self._store = store
        self._hub = hub
        self._clock = clock
        self._policy = policy
        self._versions = versions

    @classmethod
    async def load(
        cls,
        store: Store,
        hub: Hub,
        clock: Clock,
        initial: str,
        *,
        by: str = "coordinator",
        versions: StoreVersions | None = None,
    ) -> PolicyService:
        """The stored policy if there is one; otherwise `initial`, stored as version 1."""
        current = await store.current_policy()
        text = current.yaml if current else initial
        service = cls(store, hub, clock, parse_policy(text), versions)
        if current is None:
            await service._store_policy(service._policy, by)
        else:
            service._policy = replace(service._policy, version=current.version)
        return service

    def current(self) -> Policy:
        return self._policy

    async def refresh(self) -> Policy:
        """The running policy, reloaded first when the store holds a newer version (applied on
        another replica): one indexed read of the newest version number, never a stale copy
        (with `versions`, a read shared with the calls that asked before it started)."""
        if self._versions is not None:
            _, version = await self._versions.read()
        else:
            version = await self._store.policy_version()
        if version != self._policy.version:
            doc = await self._store.current_policy()
            if doc is not None and doc.version != self._policy.version:
                self._policy = replace(parse_policy(doc.yaml), version=doc.version)
        return self._policy

    async def get(self, principal: Principal) -> PolicyDocument:
        doc = await self._store.current_policy()
        if doc is None:
            raise NotFound("no policy has been applied")
        return doc

    async def apply(
        self, principal: Principal, text: str, expected_version: int, *, dry_run: bool = False
    ) -> PolicyDocument:
        """Validate `text` and make it the running policy. With `dry_run`, only validate: the
        answer is the document as it would be applied (the next version), nothing is stored
        or audited."""
        if not principal.is_admin:
            raise PermissionDenied("applying policy needs the admins group")
        policy = parse_policy(text)
        current = await self._store.current_policy()
        if expected_version and (current is None or current.version != expected_version):
            raise Conflict("policy changed meanwhile (expected version does not match)")
        if dry_run:
            return PolicyDocument(
                yaml=policy.text,
                version=(current.version if current else 0) + 1,
                sha256=policy.sha256,
                applied_at=None,
                applied_by="",
            )
        doc = await self._store_policy(policy, principal.name)
        return doc

    async def test(
        self,
        principal: Principal,
        *,
        subject: str,
        action: str,
        agent: str,
        duration: timedelta | None,
        groups: Iterable[str],
        document: str = "",
    ) -> PolicyDecision:
        """The running policy's answer, or that of `document` (YAML, validated as apply would
        and never stored) when one is given."""
        policy = parse_policy(document) if document else self._policy
        with invalid_input():
            subject = v.check(v.SUBJECT, user_name(subject), "subject")
            v.check(v.ACTION, action, "action")
            v.check(v.AGENT, agent, "agent")
            for group in groups:
                v.check(v.GROUP, group, "group")
        target = await self._store.get_agent(agent)
        if target is None:
            raise NotFound(f"agent {agent} is not enrolled")
        known = frozenset(groups) or await self._store.user_groups(subject) or frozenset()
        found = match(policy, Principal(subject, known), action, agent, target.labels)
        notes: tuple[str, ...] = ()
        rule = found.rule
        if rule is None:
            return decision(found, duration)
        auto = rule.approval.always_auto
        if rule.approval.auto is not None and rule.approval.auto.limited:
            now = self._clock.now()
            usage = budget_usage(
                await self._store.recent_auto_grants(subject, rule.name, now - DAY), now
            )
            auto, notes = auto_decision(
                rule.approval.auto, usage, duration or timedelta(seconds=1), now
            )
        plan = replace(plan_for(policy, rule), automatic=auto)
        return decision(found, duration, notes, plan)

    async def _store_policy(self, policy: Policy, by: str) -> PolicyDocument:
        """Store and swap in a new version. In the same transaction, every pending request the
        new version would deny is DENIED, decided by `policy:vN` (the requester's groups and
        the agent's labels as they are now); its pinned plan is otherwise left alone."""
        now = self._clock.now()
        denied: list[str] = []
        async with self._store.transaction() as tx:
            version = await tx.insert_policy(policy.text, policy.sha256, now, by)
            policy = replace(policy, version=version)
            entries = [
                AuditEntry(
                    AuditKind.POLICY_APPLIED,
                    by,
                    now,
                    details={
                        "version": str(version),
                        "sha256": policy.sha256,
                        "rules": ",".join(r.name for r in policy.model.rules),
                    },
                )
            ]
            for request in await tx.pending_requests():
                why = await self._would_deny(tx, policy, request)
                if not why:
                    continue
                decider = f"policy:v{version}"
                if await tx.decide_request(
                    request.id,
                    expected=RequestState.PENDING,
                    state=RequestState.DENIED,
                    at=now,
                    by=decider,
                    reason=why,
                ):
                    denied.append(request.id)
                    entries.append(
                        AuditEntry(
                            AuditKind.REQUEST_DENIED,
                            decider,
                            now,
                            subject=request.subject,
                            agent=request.agent,
                            request_id=request.id,
                            details={
                                "action": request.action,
                                "why": why,
                                "policy_version": str(version),
                            },
                        )
                    )
            await tx.audit_many(entries)
            self._policy = policy
        self._hub.requests_changed(denied)
        await self._hub.audit_written(tx.new_audit)
        return PolicyDocument(policy.text, version, policy.sha256, now, by)

    async def _would_deny(self, tx: Tx, policy: Policy, request: Request) -> str:
        """Why `policy` would deny `request` if it were asked now ('' when it would not)."""
        agent = await tx.get_agent(request.agent)
        if agent is None:
            return f"agent {request.agent} is no longer enrolled"
        groups = await tx.user_groups(request.subject) or frozenset()
        found = match(
            policy, Principal(request.subject, groups), request.action, agent.name, agent.labels
        )
        if found.rule is None:
            return f"policy version {policy.version}: {found.explanation}"
        if request.duration > found.rule.max_duration:
            return (
                f"policy version {policy.version}: rule {found.rule.name} allows at most "
                f"{format_duration(found.rule.max_duration)}"
            )
        return ""


class AuditService:
    def __init__(
        self,
        store: Store,
        hub: Hub,
        checkpoints: Callable[[], Awaitable[tuple[dict[int, str], list[int]]]] | None = None,
        readers: Readers | None = None,
    ) -> None:
        """`checkpoints` returns the signed checkpoints that verify (seq -> hash) and the seqs
        of those whose signature does not. Only `readers` (admins, auditors) read the log."""
        self._readers = readers or Readers()
        self._store = store
        self._hub = hub
        self._checkpoints = checkpoints

    async def list(
        self,
        principal: Principal,
        *,
        since: datetime | None,
        agent: str,
        subject: str,
        kind: str,
        grant_id: str,
        request_id: str,
        after_seq: int,
        limit: int,
    ) -> list[AuditEvent]:
        self.require_reader(principal)
        return await self._store.list_audit(
            since=since,
            agent=agent,
            subject=subject,
            kind=kind,
            grant_id=grant_id,
            request_id=request_id,
            after_seq=after_seq,
            limit=min(max(limit, 1), 5000),
        )

    def require_reader(self, principal: Principal) -> None:
        """Admins and auditors only (domain/reads.py); every read of the log passes here."""
        self._readers.require_audit_reader(principal)

    async def verify(self, principal: Principal) -> ChainVerification:
        self.require_reader(principal)
        trusted, forged = await self._checkpoints() if self._checkpoints else ({}, [])
        if forged:
            return ChainVerification(
                False, 0, min(forged), "checkpoint signature is not valid (forged checkpoint)", ""
            )
        verifier = ChainVerifier(trusted)
        after = 0
        while True:
            page = await self._store.audit_chain(after, VERIFY_PAGE)
            for event in page:
                if not verifier.feed(event):
                    return verifier.result()
            if len(page) < VERIFY_PAGE:
                return verifier.result()
            after = page[-1].seq

    async def wait_after(self, seq: int) -> None:
        await self._hub.wait_audit_after(seq)
