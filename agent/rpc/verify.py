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

from google.protobuf.message import DecodeError

from agent.domain.errors import MalformedCommand
from jitmesh.v1 import agentlink_pb2

from .signature import signature_holds


def verify(command: agentlink_pb2.Command, keys: Mapping[str, bytes]) -> agentlink_pb2.CommandBody:
    public = keys.get(command.key_id)
    if public is None:
        raise MalformedCommand("command is signed by an unknown key")
    if not signature_holds(public, command.signature, command.body):
        raise MalformedCommand("command signature is not valid")
    body = agentlink_pb2.CommandBody()
    try:
        body.ParseFromString(command.body)
    except DecodeError:
        raise MalformedCommand("command body does not parse") from None
    return body
