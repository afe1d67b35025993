"""The one place where a command's bytes become a `CommandBody`.

Commands carry their body as bytes so the signature covers exactly what was sent. The check runs
here, before the body is parsed: the key id must be one pinned at enrollment and the Ed25519
signature must hold over the body bytes; anything else raises `MalformedCommand` (acked REJECTED,
nothing changes). The link then refuses a body from an earlier epoch, and the engine's domain
(`agent/domain/commands.py`, `screen`) a body meant for another agent or with another sequence
number, a duplicate, a tombstoned grant id and a window that has ended.
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

from agent.domain.errors import MalformedCommand
from jitmesh.v1 import agentlink_pb2


def verify(command: agentlink_pb2.Command, keys: Mapping[str, bytes]) -> agentlink_pb2.CommandBody:
    public = keys.get(command.key_id)
    if public is None:
        raise MalformedCommand("command is signed by an unknown key")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(command.signature, command.body)
    except (InvalidSignature, ValueError):
        raise MalformedCommand("command signature is not valid") from None
    body = agentlink_pb2.CommandBody()
    try:
        body.ParseFromString(command.body)
    except DecodeError:
        raise MalformedCommand("command body does not parse") from None
    return body
