"""The operator-facing services: authorize, translate, call the domain, translate back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from jitmesh.clock import Clock, SystemClock, to_ms
from jitmesh.types import Agent, Request, TokenInfo
from jitmesh.v1 import (
    access_pb2,
    access_pb2_grpc,
    agents_pb2,
    agents_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    types_pb2,
)
from jitmesh.versions import agent_compatibility
from server.ca import AGENT_LIFETIME, CertificateError, InternalCA, Issued, agent_of
from server.checkpoints import Checkpoints
from server.domain import errors
from server.domain.access import AccessService, hash_secret
from server.domain.fleet import FleetService
from server.domain.governance import AuditService, PolicyService, TokenService
from server.domain.hub import Hub
from server.domain.models import Scope
from server.domain.signin import SignInService
from server.notify.base import Links
from server.oidc import IdTokenRejected, OidcVerifier
from server.signing import SigningKeys

from . import convert as c
from .auth import Authenticator, cert_binding, peer_certificate
from .errors import abort, mapped
from .limits import Limiter, peer_host

Ctx = grpc.aio.ServicerContext[Any, Any]
MAX_WATCH_IDS = 100
MAX_AUDIT_PAGE = 5000
MAX_CSR = 8192


def _duration(value: Any, field: str) -> timedelta:
    try:
        return c.from_dur(value, field)
    except (OverflowError, ValueError):
        raise errors.InvalidArgument(f"{field} is out of range") from None


class AccessServicer(access_pb2_grpc.AccessServicer):
    def __init__(
        self,
        auth: Authenticator,
        access: AccessService,
        hub: Hub,
        limiter: Limiter | None = None,
        links: Links | None = None,
    ) -> None:
        self._auth = auth
        self._access = access
        self._hub = hub
        self._limiter = limiter
        self._links = links or Links()

    def _request(self, value: Request) -> types_pb2.AccessRequest:
        """A request on the wire, with its page on jitmesh-web (the link notices carry)."""
        return c.request(replace(value, link=self._links.request(value.id)))

    @mapped
    async def CreateRequest(
        self, request: access_pb2.CreateRequestRequest, context: Ctx
    ) -> access_pb2.CreateRequestResponse:
        principal = await self._auth.operator(context)
        if self._limiter is not None:
            await self._limiter.take(principal.name)
        if not request.HasField("duration"):
            raise errors.InvalidArgument("duration is required")
        if request.selector and request.agent:
            raise errors.InvalidArgument("name an agent or a selector, not both")
        req, grant = await self._access.create_request(
            principal,
            agent=request.agent,
            action=request.action,
            duration=_duration(request.duration, "duration"),
            reason=request.reason,
            ticket=request.ticket,
            start_at=c.from_ts(request.start_at, "start_at")
            if request.HasField("start_at")
            else None,
            selector=dict(request.selector),
        )
        grants = [await self._access.get_grant(principal, gid) for gid in req.grant_ids]
        return access_pb2.CreateRequestResponse(
            request=self._request(req),
            grant=c.grant(grant) if grant else None,
            reused=req.reused,
            grants=[c.grant(g) for g in grants],
        )

    @mapped
    async def GetRequest(
        self, request: access_pb2.GetRequestRequest, context: Ctx
    ) -> types_pb2.AccessRequest:
        principal = await self._auth.operator(context)
        return self._request(await self._access.get_request(principal, request.id))

    @mapped
    async def ListRequests(
        self, request: access_pb2.ListRequestsRequest, context: Ctx
    ) -> access_pb2.ListRequestsResponse:
        principal = await self._auth.operator(context)
        items, token = await self._access.list_requests(
            principal,
            states=c.request_states(list(request.states)),
            subject=request.subject,
            agent=request.agent,
            page_size=request.page_size,
            page_token=request.page_token,
            reviewable=request.reviewable,
        )
        return access_pb2.ListRequestsResponse(
            requests=[self._request(r) for r in items], next_page_token=token
        )

    @mapped
    async def ReviewRequest(
        self, request: access_pb2.ReviewRequestRequest, context: Ctx
    ) -> access_pb2.ReviewRequestResponse:
        if request.on_behalf_of:
            principal = await self._auth.on_behalf(
                context, request.on_behalf_of, Scope.REVIEW_ON_BEHALF
            )
        else:
            principal = await self._auth.operator(context)
        decision = c.review_decision(request.decision)
        if decision is None:
            raise errors.InvalidArgument("decision must be APPROVE or DENY")
        req, grant = await self._access.review(principal, request.id, decision, request.reason)
        return access_pb2.ReviewRequestResponse(
            request=self._request(req), grant=c.grant(grant) if grant else None
        )

    @mapped
    async def CancelRequest(
        self, request: access_pb2.CancelRequestRequest, context: Ctx
    ) -> types_pb2.AccessRequest:
        principal = await self._auth.operator(context)
        return self._request(await self._access.cancel(principal, request.id))

    async def WatchRequests(
        self, request: access_pb2.WatchRequestsRequest, context: Ctx
    ) -> AsyncIterator[types_pb2.AccessRequest]:
        """Every change is found in the audit log after the watcher's cursor (the hub only
        wakes the loop), so a slow watcher, a merged notification or a reconnect with
        `after_change_seq` loses nothing."""
        try:
            principal = await self._auth.operator(context)
            if len(request.ids) > MAX_WATCH_IDS:
                raise errors.InvalidArgument(f"watch at most {MAX_WATCH_IDS} ids")
            wanted = frozenset(request.ids)
            async with self._hub.watch_requests() as queue:
                # Subscribed first, then the cursor: a change between the two is seen twice at
                # worst (a snapshot's change_seq tells), never missed.
                cursor = request.after_change_seq or await self._access.head()
                # The current state of each watched id first, so a watcher never misses a
                # change made before it subscribed.
                for rid in sorted(wanted):
                    yield self._request(await self._access.get_request(principal, rid))
                while True:
                    changed, cursor = await self._access.changes(principal, cursor, wanted)
                    for found in changed:
                        yield self._request(found)
                    await queue.get()
                    while not queue.empty():
                        queue.get_nowait()
                    # Checked again for every change: a token or certificate revoked, or a user
                    # disabled, ends the stream here instead of watching on.
                    principal = await self._auth.operator(context)
        except errors.DomainError as exc:
            await abort(context, exc)

    @mapped
    async def GetGrant(self, request: access_pb2.GetGrantRequest, context: Ctx) -> types_pb2.Grant:
        principal = await self._auth.operator(context)
        return c.grant(await self._access.get_grant(principal, request.id))

    @mapped
    async def ListGrants(
        self, request: access_pb2.ListGrantsRequest, context: Ctx
    ) -> access_pb2.ListGrantsResponse:
        principal = await self._auth.operator(context)
        items, token = await self._access.list_grants(
            principal,
            states=c.grant_states(list(request.states)),
            subject=request.subject,
            agent=request.agent,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return access_pb2.ListGrantsResponse(
            grants=[c.grant(g) for g in items], next_page_token=token
        )

    @mapped
    async def RevokeGrant(
        self, request: access_pb2.RevokeGrantRequest, context: Ctx
    ) -> types_pb2.Grant:
        principal = await self._auth.operator(context)
        return c.grant(await self._access.revoke(principal, request.id, request.reason))

    @mapped
    async def ReleaseGrant(
        self, request: access_pb2.ReleaseGrantRequest, context: Ctx
    ) -> types_pb2.Grant:
        principal = await self._auth.operator(context)
        return c.grant(await self._access.release(principal, request.id))

    @mapped
    async def ExtendGrant(
        self, request: access_pb2.ExtendGrantRequest, context: Ctx
    ) -> access_pb2.ExtendGrantResponse:
        principal = await self._auth.operator(context)
        if not request.HasField("by"):
            raise errors.InvalidArgument("by is required (how much later the grant should end)")
        grant, pending = await self._access.extend(
            principal, request.id, _duration(request.by, "by"), request.reason, request.ticket
        )
        return access_pb2.ExtendGrantResponse(
            grant=c.grant(grant), request=self._request(pending) if pending else None
        )

    @mapped
    async def ListRequestOptions(
        self, request: access_pb2.ListRequestOptionsRequest, context: Ctx
    ) -> access_pb2.ListRequestOptionsResponse:
        principal = await self._auth.operator(context)
        found = await self._access.options(principal, agent=request.agent, action=request.action)
        return access_pb2.ListRequestOptionsResponse(
            options=[c.request_option(o) for o in found],
            policy_version=self._access.policy_version(),
        )


class AgentsServicer(agents_pb2_grpc.AgentsServicer):
    def __init__(
        self,
        auth: Authenticator,
        fleet: FleetService,
        keys: SigningKeys,
        ca: InternalCA | None = None,
        agent_port: int = 0,
        enroll_limits: tuple[Limiter, Limiter] | None = None,
        cert_lifetime: timedelta = AGENT_LIFETIME,
    ) -> None:
        """`enroll_limits`: (per peer address, overall) for Enroll, which needs no credential."""
        self._auth = auth
        self._cert_lifetime = cert_lifetime
        self._peer_limit: Limiter | None = None
        self._overall_limit: Limiter | None = None
        if enroll_limits is not None:
            self._peer_limit, self._overall_limit = enroll_limits
        self._fleet = fleet
        self._keys = keys
        # With a CA, agents enroll with a CSR and connect with mTLS only.
        self._ca = ca
        self._agent_port = agent_port

    @mapped
    async def ListAgents(
        self, request: agents_pb2.ListAgentsRequest, context: Ctx
    ) -> agents_pb2.ListAgentsResponse:
        principal = await self._auth.operator(context)
        agents = await self._fleet.list_agents(principal)
        return agents_pb2.ListAgentsResponse(agents=[self._agent(a) for a in agents])

    @mapped
    async def GetAgent(self, request: agents_pb2.GetAgentRequest, context: Ctx) -> types_pb2.Agent:
        principal = await self._auth.operator(context)
        return self._agent(await self._fleet.get_agent(principal, request.name))

    def _agent(self, agent: Agent) -> types_pb2.Agent:
        """The agent, with how this coordinator serves its version (docs/wire.md)."""
        out = c.agent(agent)
        if agent.version:
            out.compatibility = agent_compatibility(agent.version, self._fleet.version).value
        return out

    @mapped
    async def CreateJoinToken(
        self, request: agents_pb2.CreateJoinTokenRequest, context: Ctx
    ) -> agents_pb2.CreateJoinTokenResponse:
        principal = await self._auth.operator(context)
        ttl = _duration(request.ttl, "ttl") if request.HasField("ttl") else None
        token, info = await self._fleet.create_join_token_info(
            principal, dict(request.labels), ttl, replaces=request.replaces
        )
        return agents_pb2.CreateJoinTokenResponse(
            token=token,
            expires_at=c.ts(info.expires_at),
            id=info.id,
            labels=info.labels,
            replaces=info.replaces,
        )

    @mapped
    async def ListJoinTokens(
        self, request: agents_pb2.ListJoinTokensRequest, context: Ctx
    ) -> agents_pb2.ListJoinTokensResponse:
        principal = await self._auth.operator(context)
        tokens = await self._fleet.list_join_tokens(principal, include_ended=request.include_ended)
        return agents_pb2.ListJoinTokensResponse(tokens=[c.join_token_info(t) for t in tokens])

    @mapped
    async def RevokeJoinToken(
        self, request: agents_pb2.RevokeJoinTokenRequest, context: Ctx
    ) -> agents_pb2.JoinTokenInfo:
        principal = await self._auth.operator(context)
        info = await self._fleet.revoke_join_token(principal, request.id, request.reason)
        return c.join_token_info(info)

    @mapped
    async def RemoveAgent(
        self, request: agents_pb2.RemoveAgentRequest, context: Ctx
    ) -> agents_pb2.RemoveAgentResponse:
        principal = await self._auth.operator(context)
        await self._fleet.remove_agent(principal, request.name)
        return agents_pb2.RemoveAgentResponse()

    @mapped
    async def Enroll(
        self, request: agents_pb2.EnrollRequest, context: Ctx
    ) -> agents_pb2.EnrollResponse:
        # Unauthenticated: limited per peer address and overall before anything else is done.
        peer = peer_host(context.peer() or "")
        for limiter, caller in ((self._peer_limit, peer), (self._overall_limit, "*")):
            if limiter is None:
                continue
            try:
                await limiter.take(caller)
            except errors.RateLimited as exc:
                if exc.first:
                    await self._fleet.enrollment_refused(
                        request.name[:64],
                        "rate limited" + ("" if caller == peer else " (all)"),
                        peer,
                    )
                raise
        if self._ca is None:
            name, credential = await self._fleet.enroll(
                request.join_token, request.name, dict(request.labels), peer=peer
            )
            return agents_pb2.EnrollResponse(
                agent=name, credential=credential, signing_keys=self._signing_keys()
            )
        if not request.csr:
            raise errors.InvalidArgument("enrollment needs a CSR: this coordinator requires mTLS")
        csr = bytes(request.csr)
        if len(csr) > MAX_CSR:
            raise errors.InvalidArgument("csr is too large")
        issued: list[Issued] = []

        def issue(name: str) -> str:
            # Runs only once the join token has been checked and spent; again with the same
            # certificate if that transaction was rolled back (a batch with a refusal in it).
            if not issued:
                issued.append(self._issue(csr, name))
            return cert_binding(name, issued[0].serial)

        name, _ = await self._fleet.enroll(
            request.join_token, request.name, dict(request.labels), issue, peer=peer
        )
        assert self._ca is not None
        return agents_pb2.EnrollResponse(
            agent=name,
            certificate=issued[0].pem,
            ca_bundle=self._ca.ca_pem,
            signing_keys=self._signing_keys(),
            agent_port=self._agent_port,
        )

    @mapped
    async def RenewCertificate(
        self, request: agents_pb2.RenewCertificateRequest, context: Ctx
    ) -> agents_pb2.RenewCertificateResponse:
        pem = peer_certificate(context)
        if self._ca is None or pem is None:
            raise errors.Unauthenticated("renewal needs the agent's current client certificate")
        try:
            name, serial = agent_of(pem)
        except CertificateError as exc:
            raise errors.Unauthenticated(str(exc)) from None
        # The certificate must be the agent's current one before the CA signs anything.
        principal = await self._fleet.authenticate_agent(cert_binding(name, serial))
        issued = self._issue(bytes(request.csr), name)
        await self._fleet.renew_credential(
            principal, cert_binding(name, serial), cert_binding(name, issued.serial)
        )
        return agents_pb2.RenewCertificateResponse(
            certificate=issued.pem, ca_bundle=self._ca.ca_pem
        )

    def _issue(self, csr: bytes, name: str) -> Issued:
        assert self._ca is not None
        if len(csr) > MAX_CSR:
            raise errors.InvalidArgument("csr is too large")
        try:
            # Certificates are checked by TLS against the real clock, so they are made with it.
            return self._ca.sign_agent_csr(csr, name, datetime.now(UTC), self._cert_lifetime)
        except CertificateError as exc:
            raise errors.InvalidArgument(str(exc)) from None

    def _signing_keys(self) -> list[agents_pb2.SigningKey]:
        return [
            agents_pb2.SigningKey(
                key_id=k.key_id,
                public_key=k.public_raw,
                not_after=c.ts(k.not_after) if k.not_after else None,
            )
            for k in self._keys.public_keys()
        ]


def _token_info(info: TokenInfo) -> identity_pb2.TokenInfo:
    return identity_pb2.TokenInfo(
        id=info.id,
        user=info.user,
        label=info.label,
        created_at=c.ts(info.created_at),
        expires_at=c.ts(info.expires_at),
        revoked_at=c.ts(info.revoked_at),
        scopes=list(info.scopes),
    )


class IdentityServicer(identity_pb2_grpc.IdentityServicer):
    def __init__(
        self,
        auth: Authenticator,
        tokens: TokenService,
        oidc: OidcVerifier | None = None,
        signin: SignInService | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._auth = auth
        self._tokens = tokens
        self._oidc = oidc
        self._signin = signin
        self._clock = clock or SystemClock()

    @mapped
    async def WhoAmI(
        self, request: identity_pb2.WhoAmIRequest, context: Ctx
    ) -> identity_pb2.UserInfo:
        principal = await self._auth.operator(context)
        return c.user_info(await self._tokens.whoami(principal))

    @mapped
    async def GetSignInConfig(
        self, request: identity_pb2.GetSignInConfigRequest, context: Ctx
    ) -> identity_pb2.SignInConfig:
        # No bearer token: this is what a client needs before it has one.
        if self._oidc is None:
            raise errors.NotFound("single sign-on is not configured on this coordinator")
        s = self._oidc.settings
        return identity_pb2.SignInConfig(
            issuer=s.issuer, client_id=s.client_id, scopes=list(s.scopes), audience=s.client_id
        )

    @mapped
    async def ExchangeIdToken(
        self, request: identity_pb2.ExchangeIdTokenRequest, context: Ctx
    ) -> identity_pb2.ExchangeIdTokenResponse:
        # No bearer token: the ID token, checked here, is the credential.
        if self._oidc is None or self._signin is None:
            raise errors.NotFound("single sign-on is not configured on this coordinator")
        try:
            claims = await self._oidc.verify(request.id_token, request.nonce)
        except IdTokenRejected as exc:
            raise errors.Unauthenticated(f"ID token refused: {exc}") from None
        ttl = _duration(request.ttl, "ttl") if request.HasField("ttl") else None
        now = self._clock.now()
        token, user, groups, expires_at = await self._signin.sign_in(
            claims, self._oidc.settings.issuer, now, ttl, hash_secret
        )
        info = identity_pb2.TokenInfo(
            id=hash_secret(token)[:16], user=user, label="oidc sign-in",
            created_at=c.ts(now), expires_at=c.ts(expires_at), source="oidc",
        )  # fmt: skip
        return identity_pb2.ExchangeIdTokenResponse(
            token=token,
            info=info,
            user=identity_pb2.UserInfo(name=user, groups=sorted(groups), managed_by="oidc"),
        )

    @mapped
    async def CreateToken(
        self, request: identity_pb2.CreateTokenRequest, context: Ctx
    ) -> identity_pb2.CreateTokenResponse:
        principal = await self._auth.operator(context)
        ttl = _duration(request.ttl, "ttl") if request.HasField("ttl") else None
        token, info = await self._tokens.create(
            principal, request.user, list(request.groups), ttl, request.label, list(request.scopes)
        )
        return identity_pb2.CreateTokenResponse(token=token, info=_token_info(info))

    @mapped
    async def SetUserGroups(
        self, request: identity_pb2.SetUserGroupsRequest, context: Ctx
    ) -> identity_pb2.UserInfo:
        principal = await self._auth.operator(context)
        info = await self._tokens.set_groups(
            principal, request.user, list(request.groups), request.reason
        )
        return c.user_info(info)

    @mapped
    async def ListTokens(
        self, request: identity_pb2.ListTokensRequest, context: Ctx
    ) -> identity_pb2.ListTokensResponse:
        principal = await self._auth.operator(context)
        tokens = await self._tokens.list(principal, request.user)
        return identity_pb2.ListTokensResponse(tokens=[_token_info(t) for t in tokens])

    @mapped
    async def RevokeToken(
        self, request: identity_pb2.RevokeTokenRequest, context: Ctx
    ) -> identity_pb2.RevokeTokenResponse:
        principal = await self._auth.operator(context)
        await self._tokens.revoke(principal, request.id)
        return identity_pb2.RevokeTokenResponse()

    @mapped
    async def SetUserDisabled(
        self, request: identity_pb2.SetUserDisabledRequest, context: Ctx
    ) -> identity_pb2.SetUserDisabledResponse:
        principal = await self._auth.operator(context)
        await self._tokens.set_disabled(principal, request.user, request.disabled)
        return identity_pb2.SetUserDisabledResponse()

    @mapped
    async def RevokeCertificate(
        self, request: identity_pb2.RevokeCertificateRequest, context: Ctx
    ) -> identity_pb2.RevokeCertificateResponse:
        principal = await self._auth.operator(context)
        await self._tokens.revoke_certificate(principal, request.serial, request.reason)
        return identity_pb2.RevokeCertificateResponse()


class PolicyServicer(policy_pb2_grpc.PolicyServicer):
    def __init__(self, auth: Authenticator, policy: PolicyService) -> None:
        self._auth = auth
        self._policy = policy

    @mapped
    async def GetPolicy(
        self, request: policy_pb2.GetPolicyRequest, context: Ctx
    ) -> policy_pb2.PolicyDocument:
        principal = await self._auth.operator(context)
        return c.policy_document(await self._policy.get(principal))

    @mapped
    async def ApplyPolicy(
        self, request: policy_pb2.ApplyPolicyRequest, context: Ctx
    ) -> policy_pb2.PolicyDocument:
        principal = await self._auth.operator(context)
        doc = await self._policy.apply(
            principal,
            request.yaml,
            c.number(request.expected_version, "expected_version"),
            dry_run=request.dry_run,
        )
        return c.policy_document(doc)

    @mapped
    async def TestPolicy(
        self, request: policy_pb2.TestPolicyRequest, context: Ctx
    ) -> policy_pb2.TestPolicyResponse:
        principal = await self._auth.operator(context)
        result = await self._policy.test(
            principal,
            subject=request.subject,
            action=request.action,
            agent=request.agent,
            duration=_duration(request.duration, "duration")
            if request.HasField("duration")
            else None,
            groups=list(request.groups),
            document=request.policy_yaml,
        )
        return c.policy_decision(result)


class AuditServicer(audit_pb2_grpc.AuditServicer):
    def __init__(
        self, auth: Authenticator, audit: AuditService, checkpoints: Checkpoints | None = None
    ) -> None:
        self._auth = auth
        self._audit = audit
        self._checkpoints = checkpoints

    @mapped
    async def ListEvents(
        self, request: audit_pb2.ListEventsRequest, context: Ctx
    ) -> audit_pb2.ListEventsResponse:
        principal = await self._auth.operator(context)
        after = c.number(
            int(request.page_token) if request.page_token.isdigit() else request.after_seq,
            "after_seq or page_token",
        )
        # Owned by the operations issue (export ranges); checked here already.
        c.number(request.to_seq, "to_seq")
        # Capped here, not only in the domain: a page cut short by the cap must still carry a
        # next_page_token, or the caller silently misses the rest.
        limit = min(request.page_size, MAX_AUDIT_PAGE) if request.page_size > 0 else 1000
        events = await self._audit.list(
            principal,
            since=c.from_ts(request.since, "since") if request.HasField("since") else None,
            agent=request.agent,
            subject=request.subject,
            kind=request.kind,
            grant_id=request.grant_id,
            request_id=request.request_id,
            after_seq=after,
            limit=limit,
        )
        token = str(events[-1].seq) if len(events) >= limit else ""
        return audit_pb2.ListEventsResponse(
            events=[c.audit_event(x) for x in events], next_page_token=token
        )

    async def TailEvents(
        self, request: audit_pb2.TailEventsRequest, context: Ctx
    ) -> AsyncIterator[types_pb2.AuditEvent]:
        try:
            principal = await self._auth.operator(context)
            after = c.number(request.after_seq, "after_seq")
            while True:
                events = await self._audit.list(
                    principal,
                    since=None,
                    agent="",
                    subject="",
                    kind="",
                    grant_id="",
                    request_id="",
                    after_seq=after,
                    limit=1000,
                )
                if events:
                    # Checked again before every batch: a revoked token or certificate, or a
                    # disabled user, ends the tail (the revocation is itself an event).
                    principal = await self._auth.operator(context)
                for event in events:
                    yield c.audit_event(event)
                    after = event.seq
                if not events:
                    await self._audit.wait_after(after)
        except errors.DomainError as exc:
            await abort(context, exc)

    @mapped
    async def VerifyChain(
        self, request: audit_pb2.VerifyChainRequest, context: Ctx
    ) -> audit_pb2.VerifyChainResponse:
        principal = await self._auth.operator(context)
        return c.verification(await self._audit.verify(principal))

    @mapped
    async def ListCheckpoints(
        self, request: audit_pb2.ListCheckpointsRequest, context: Ctx
    ) -> audit_pb2.ListCheckpointsResponse:
        principal = await self._auth.operator(context)
        self._audit.require_reader(principal)
        if self._checkpoints is None:
            return audit_pb2.ListCheckpointsResponse()
        return audit_pb2.ListCheckpointsResponse(
            checkpoints=[
                audit_pb2.AuditCheckpoint(
                    seq=cp.seq,
                    hash=cp.hash,
                    at_ms=to_ms(cp.at),
                    key_id=cp.key_id,
                    signature=cp.signature,
                )
                for cp in await self._checkpoints.read()
            ],
            keys=[
                agents_pb2.SigningKey(key_id=k.key_id, public_key=k.public_raw)
                for k in self._checkpoints.public_keys()
            ],
        )
