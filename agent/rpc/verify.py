"""The one place where a command's bytes become a `CommandBody`.

Every check on a command's authenticity and freshness lives here. Commands carry their body as
bytes so the signature covers exactly what was sent, and the signature is checked before the body
is parsed: the key id must be one pinned at enrollment and the Ed25519 signature must hold over
the body bytes. The parsed body must then come from the current coordinator epoch or a later one
(an earlier one is a replay, or an old coordinator process that woke up after a newer one took
over). Anything else raises `MalformedCommand` (acked REJECTED, nothing changes). The engine's
domain (`agent/domain/commands.py`, `screen`) then refuses a body meant for another agent or with
another sequence number, a duplicate, a tombstoned grant id and a window that has ended.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.message import DecodeError

from agent.domain.errors import MalformedCommand
from jitmesh.v1 import agentlink_pb2

from .signature import signature_holds


def verify(
    command: agentlink_pb2.Command, keys: Mapping[str, bytes], *, min_epoch: int
) -> agentlink_pb2.CommandBody:
    """The body of a command signed by one of `keys` (key id -> raw Ed25519 public key) and
    issued in epoch `min_epoch` or later (the highest epoch this agent has seen)."""
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
    if body.epoch < min_epoch:
        # Signed, but by an earlier coordinator run: a replay or a stale coordinator.
        raise MalformedCommand("command is from an earlier coordinator epoch")
    return body
