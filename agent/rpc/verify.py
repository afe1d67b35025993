"""The one place where a command's bytes become a `CommandBody`.

Commands carry their body as bytes so a signature can cover exactly what was sent. Signatures are
not checked yet; when the coordinator signs commands (Ed25519 over `command.body`, key
`command.key_id`), the check goes here, before the body is parsed, and a bad signature raises
`MalformedCommand` like a body that does not parse.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from agent.domain.errors import MalformedCommand
from jitmesh.v1 import agentlink_pb2


def verify(command: agentlink_pb2.Command) -> agentlink_pb2.CommandBody:
    body = agentlink_pb2.CommandBody()
    try:
        body.ParseFromString(command.body)
    except DecodeError:
        raise MalformedCommand("command body does not parse") from None
    return body
