"""Break-glass codes at the agent's edge: base64url text to a verified `Code` (docs/wire.md,
"Break-glass codes"). The signature is checked, before the body is parsed, under the keys a code
may be signed by: the pinned command-signing keys and the retired keys kept for codes
(`agent.domain.breakglass.code_keys`); nothing of the code is echoed in errors or logs."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping

from google.protobuf.message import DecodeError

from agent.domain.breakglass import Code
from agent.domain.errors import MalformedCommand
from jitmesh import validation
from jitmesh.v1 import breakglass_pb2

from .convert import from_duration, from_timestamp
from .signature import signature_holds

SIGNED_PREFIX = b"jitmesh-breakglass/v1\n"
CODE_ID = re.compile(r"[0-9a-f]{32}")
# A code is a few hundred characters; anything far longer is not one.
MAX_TEXT = 4096


class BadCode(Exception):
    """The text is not a code this agent can trust. The message says why, echoing nothing."""


def read_code(text: str, keys: Mapping[str, bytes]) -> Code:
    text = "".join(text.split())
    if not text or len(text) > MAX_TEXT:
        raise BadCode("this is not a break-glass code")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        signed = breakglass_pb2.BreakglassCode.FromString(raw)
    except (binascii.Error, ValueError, DecodeError):
        raise BadCode("this is not a break-glass code") from None
    public = keys.get(signed.key_id)
    if public is None or not signature_holds(public, signed.signature, SIGNED_PREFIX + signed.body):
        raise BadCode("this code was not issued by this host's coordinator (signature)")
    try:
        body = breakglass_pb2.BreakglassGrant.FromString(signed.body)
        if not body.HasField("expires_at") or not body.HasField("duration"):
            raise BadCode("this code has no expiry or no duration")
        if not CODE_ID.fullmatch(body.code_id):
            raise BadCode("this code has no valid id")
        return Code(
            code_id=body.code_id,
            agent=validation.check(validation.AGENT, body.agent, "agent"),
            subject=validation.check(validation.SUBJECT, body.subject, "subject"),
            action=validation.check(validation.ACTION, body.action, "action"),
            duration=from_duration(body.duration, "duration"),
            issued_at=from_timestamp(body.issued_at, "issued_at"),
            expires_at=from_timestamp(body.expires_at, "expires_at"),
            issued_by=body.issued_by[:128],
            raw=raw,
        )
    except (DecodeError, validation.ValidationError, MalformedCommand):
        raise BadCode("this code's contents are not valid") from None
