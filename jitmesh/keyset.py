"""The bytes a coordinator signs when it announces its signing keys to agents (Welcome).

Shared by the coordinator (signs) and the agent (verifies), so both build exactly the same bytes.
Two lists, each under its own prefix so that a signature over one can never pass for the other:
the command-signing keys (`keys_bytes`), and since 0.2 the retired keys kept for break-glass
codes only (`breakglass_keys_bytes`; docs/wire.md, "Break-glass codes").
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

PREFIX = b"jitmesh-signing-keys/v1\n"
BREAKGLASS_PREFIX = b"jitmesh-breakglass-keys/v1\n"


def keys_bytes(keys: Iterable[tuple[str, bytes, int]]) -> bytes:
    """`keys`: (key id, raw public key, not_after in epoch ms or 0 for none), in any order."""
    return PREFIX + _lines(keys)


def breakglass_keys_bytes(keys: Iterable[tuple[str, bytes, int]]) -> bytes:
    """As `keys_bytes`, for `Welcome.breakglass_keys` (keys that verify break-glass codes only)."""
    return BREAKGLASS_PREFIX + _lines(keys)


def _lines(keys: Iterable[tuple[str, bytes, int]]) -> bytes:
    lines = sorted(f"{kid}:{base64.b64encode(pub).decode()}:{na}" for kid, pub, na in keys)
    return "\n".join(lines).encode()


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
