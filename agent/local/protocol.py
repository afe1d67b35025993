"""One JSON object per line, both ways, over the agent's unix socket. Shared by both ends."""

from __future__ import annotations

import json
from typing import Any

SOCKET_NAME = "agent.sock"
# No message is anywhere near this: a peer that sends more is refused.
MAX_LINE = 64 * 1024


class ProtocolError(Exception):
    """A line that is not one JSON object (or too long)."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE:
        raise ProtocolError("message too long")
    try:
        message = json.loads(line)
    except ValueError:
        raise ProtocolError("not JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("not a JSON object")
    return message
