"""The coordinator's signing public keys as the agent keeps them, each file 0600, written
atomically:

- `STATE/signing_keys.json`: the command-signing keys, pinned at enrollment and replaced by each
  Welcome's signed list. Commands signed by any other key are refused.
- `STATE/breakglass_keys.json` (since 0.2): retired keys announced for break-glass codes only,
  each with the instant it stops verifying them (docs/wire.md, "Break-glass codes").
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path

from agent.domain.breakglass import BreakglassKey
from agent.store.credential import CredentialFile
from jitmesh.clock import from_ms, to_ms

BREAKGLASS_KEYS_NAME = "breakglass_keys.json"


class PinnedKeys:
    def __init__(self, path: Path) -> None:
        self._file = CredentialFile(path)

    def read(self) -> dict[str, bytes]:
        """key id -> raw Ed25519 public key; empty when nothing is pinned (all commands fail)."""
        text = self._file.read()
        if text is None:
            return {}
        try:
            items = json.loads(text)
            return {str(k): base64.b64decode(v, validate=True) for k, v in items.items()}
        except (ValueError, AttributeError):
            return {}

    def write(self, keys: dict[str, bytes]) -> None:
        self._file.write(json.dumps({k: base64.b64encode(v).decode() for k, v in keys.items()}))

    def delete(self) -> None:
        self._file.delete()


class BreakglassKeys:
    def __init__(self, path: Path) -> None:
        self._file = CredentialFile(path)

    def read(self) -> dict[str, BreakglassKey]:
        """key id -> key; empty when there is none or the file does not parse (codes are then
        checked under the command keys alone)."""
        text = self._file.read()
        if text is None:
            return {}
        try:
            items = json.loads(text)
            return {
                str(kid): BreakglassKey(
                    base64.b64decode(item["public_key"], validate=True),
                    from_ms(int(item["not_after_ms"])),
                )
                for kid, item in items.items()
            }
        except (ValueError, AttributeError, KeyError, TypeError, OverflowError):
            return {}

    def write(self, keys: Mapping[str, BreakglassKey]) -> None:
        self._file.write(
            json.dumps(
                {
                    kid: {
                        "public_key": base64.b64encode(key.public_key).decode(),
                        "not_after_ms": to_ms(key.not_after),
                    }
                    for kid, key in sorted(keys.items())
                }
            )
        )
