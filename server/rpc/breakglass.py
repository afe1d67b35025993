"""The Breakglass service, and the codes' bytes: authorize, translate, call the domain,
translate back (docs/wire.md, "Break-glass codes")."""

from __future__ import annotations

import base64
from datetime import datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

from jitmesh import convert as shared
from jitmesh.v1 import breakglass_pb2, breakglass_pb2_grpc
from server.domain.breakglass import BreakglassService, CodeTerms
from server.signing import SigningKeys

from . import convert as c
from .auth import Authenticator
from .errors import mapped
from .services import Ctx, _duration

SIGNED_PREFIX = b"jitmesh-breakglass/v1\n"


class BreakglassCodec:
    """Signs codes with the current command-signing key and reads them back (`CodeSigner`)."""

    def __init__(self, keys: SigningKeys) -> None:
        self._keys = keys

    def sign(self, terms: CodeTerms) -> tuple[str, str]:
        body = breakglass_pb2.BreakglassGrant(
            code_id=terms.code_id,
            agent=terms.agent,
            subject=terms.subject,
            action=terms.action,
            duration=c.dur(terms.duration),
            issued_at=c.ts(terms.issued_at),
            expires_at=c.ts(terms.expires_at),
            issued_by=terms.issued_by,
            epoch=terms.epoch,
        ).SerializeToString(deterministic=True)
        key_id, signature = self._keys.sign(SIGNED_PREFIX + body)
        code = breakglass_pb2.BreakglassCode(body=body, key_id=key_id, signature=signature)
        return key_id, base64.urlsafe_b64encode(code.SerializeToString()).decode().rstrip("=")

    def signed_between(self, first: datetime, last: datetime) -> list[str]:
        return self._keys.signed_between(first, last)

    def verify(self, code: bytes) -> CodeTerms | None:
        try:
            signed = breakglass_pb2.BreakglassCode.FromString(code)
        except DecodeError:
            return None
        key = next(
            (k for k in self._keys.public_keys(all_keys=True) if k.key_id == signed.key_id), None
        )
        if key is None:
            return None
        try:
            Ed25519PublicKey.from_public_bytes(key.public_raw).verify(
                signed.signature, SIGNED_PREFIX + signed.body
            )
            body = breakglass_pb2.BreakglassGrant.FromString(signed.body)
            return CodeTerms(
                code_id=body.code_id,
                agent=body.agent,
                subject=body.subject,
                action=body.action,
                duration=c.from_dur(body.duration, "duration"),
                issued_at=c.from_ts(body.issued_at, "issued_at"),
                expires_at=c.from_ts(body.expires_at, "expires_at"),
                issued_by=body.issued_by,
                epoch=body.epoch,
            )
        except (InvalidSignature, DecodeError, ValueError):
            return None


class BreakglassServicer(breakglass_pb2_grpc.BreakglassServicer):
    def __init__(self, auth: Authenticator, codes: BreakglassService) -> None:
        self._auth = auth
        self._codes = codes

    @mapped
    async def IssueBreakglassCodes(
        self, request: breakglass_pb2.IssueBreakglassCodesRequest, context: Ctx
    ) -> breakglass_pb2.IssueBreakglassCodesResponse:
        principal = await self._auth.operator(context)
        issued = await self._codes.issue(
            principal,
            agent=request.agent,
            subject=request.subject,
            action=request.action,
            duration=_duration(request.duration, "duration"),
            valid_for=_duration(request.valid_for, "valid_for"),
            count=request.count,
            reason=request.reason,
        )
        return breakglass_pb2.IssueBreakglassCodesResponse(
            codes=[
                breakglass_pb2.IssuedBreakglassCode(
                    info=shared.breakglass_code_to_proto(code), code=text
                )
                for code, text in issued
            ]
        )

    @mapped
    async def ListBreakglassCodes(
        self, request: breakglass_pb2.ListBreakglassCodesRequest, context: Ctx
    ) -> breakglass_pb2.ListBreakglassCodesResponse:
        principal = await self._auth.operator(context)
        codes = await self._codes.list(
            principal,
            unreviewed=request.unreviewed,
            agent=request.agent,
            subject=request.subject,
            include_expired=request.include_expired,
        )
        return breakglass_pb2.ListBreakglassCodesResponse(
            codes=[shared.breakglass_code_to_proto(code) for code in codes]
        )

    @mapped
    async def ReviewBreakglassUse(
        self, request: breakglass_pb2.ReviewBreakglassUseRequest, context: Ctx
    ) -> breakglass_pb2.BreakglassCodeInfo:
        principal = await self._auth.operator(context)
        code = await self._codes.review(principal, request.id, request.note)
        return shared.breakglass_code_to_proto(code)
