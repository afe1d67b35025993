"""The bytes a coordinator signs when it announces its command-signing keys to agents (Welcome).

Shared by the coordinator (signs) and the agent (verifies), so both build exactly the same bytes.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

PREFIX = b"jitmesh-signing-keys/v1\n"


def keys_bytes(keys: Iterable[tuple[str, bytes, int]]) -> bytes:
    """`keys`: (key id, raw public key, not_after in epoch ms or 0 for none), in any order."""
    lines = sorted(f"{kid}:{base64.b64encode(pub).decode()}:{na}" for kid, pub, na in keys)
    return PREFIX + "\n".join(lines).encode()


def key_entries(keys: Iterable[Any]) -> list[tuple[str, bytes, int]]:
    """The entries of `SigningKey` messages (jitmesh.v1; not imported here, so the value types
    stay free of protobuf), as both sides feed them to `keys_bytes`."""
    return [
        (
            k.key_id,
            bytes(k.public_key),
            k.not_after.ToMilliseconds() if k.HasField("not_after") else 0,
        )
        for k in keys
    ]
