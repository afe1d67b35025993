"""The bytes a coordinator signs when it announces its signing keys to agents (Welcome).

Shared by the coordinator (signs) and the agent (verifies), so both build exactly the same bytes.
Two lists, each under its own prefix so that a signature over one can never pass for the other:
the command-signing keys (`keys_bytes`), and since 0.2 the retired keys kept for break-glass
codes only (`breakglass_keys_bytes`; docs/wire.md, "Break-glass codes"), which also names the
agent and the Welcome's time: a list signed for one agent, or an older one, never passes for
another agent's or the latest.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

PREFIX = b"jitmesh-signing-keys/v1\n"
BREAKGLASS_PREFIX = b"jitmesh-breakglass-keys/v1\n"
# The longest a break-glass code is valid: the coordinator issues none for longer, and an agent
# trusts an announced break-glass key no longer than this past its own time.
MAX_CODE_VALID_FOR = timedelta(days=90)


def keys_bytes(keys: Iterable[tuple[str, bytes, int]]) -> bytes:
    """`keys`: (key id, raw public key, not_after in epoch ms or 0 for none), in any order."""
    return PREFIX + _lines(keys)


def breakglass_keys_bytes(
    keys: Iterable[tuple[str, bytes, int]], *, agent: str, at_ms: int
) -> bytes:
    """As `keys_bytes`, for `Welcome.breakglass_keys` (keys that verify break-glass codes only),
    bound to the agent it is for and the Welcome's `coordinator_time` (epoch ms)."""
    return BREAKGLASS_PREFIX + f"{agent}\n{at_ms}\n".encode() + _lines(keys)


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
