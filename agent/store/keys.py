"""The coordinator's command-signing public keys, pinned at enrollment in `STATE/signing_keys.json`
(0600, written atomically). Commands signed by any other key are refused."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from agent.store.credential import CredentialFile


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
