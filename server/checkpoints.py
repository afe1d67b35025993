"""Signed audit checkpoints, appended to `DATA/audit_checkpoints.jsonl` (0600), outside the
database: each line is the chain head (seq, hash) at a time, signed with the coordinator's
Ed25519 key over `server.domain.audit.checkpoint_bytes`. Copy the file (or `jitctl audit
export`) somewhere the coordinator's host cannot write, and a rewrite of the whole chain, or a
cut-off tail, is caught even by someone holding the database."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from jitmesh.clock import Clock, from_ms, to_ms
from server.domain.audit import checkpoint_bytes
from server.signing import PublicKey, SigningKeys

log = logging.getLogger(__name__)
FILE_NAME = "audit_checkpoints.jsonl"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    hash: str
    at: datetime
    key_id: str
    signature: bytes

    def line(self) -> dict[str, object]:
        return {
            "type": "checkpoint",
            "seq": self.seq,
            "hash": self.hash,
            "at_ms": to_ms(self.at),
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode(),
        }


class Checkpoints:
    def __init__(self, data_dir: Path, keys: SigningKeys) -> None:
        self.path = data_dir / FILE_NAME
        self._keys = keys
        self._last: tuple[int, str] | None = None

    def read(self) -> list[Checkpoint]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                item = json.loads(line)
                out.append(
                    Checkpoint(
                        int(item["seq"]),
                        str(item["hash"]),
                        from_ms(int(item["at_ms"])),
                        str(item["key_id"]),
                        base64.b64decode(item["signature"]),
                    )
                )
            except (ValueError, KeyError, TypeError):
                # An unreadable line is a forged one: report it as such, at seq 0.
                out.append(Checkpoint(0, "", from_ms(0), "", b""))
        return out

    def public_keys(self) -> list[PublicKey]:
        return self._keys.public_keys(None, all_keys=True)

    def verified(self) -> tuple[dict[int, str], list[int]]:
        """(seq -> hash of checkpoints that verify, seqs of those that do not)."""
        keys = {k.key_id: k.public_raw for k in self._keys.public_keys(None, all_keys=True)}
        trusted: dict[int, str] = {}
        forged: list[int] = []
        for cp in self.read():
            public = keys.get(cp.key_id)
            try:
                if public is None:
                    raise InvalidSignature
                Ed25519PublicKey.from_public_bytes(public).verify(
                    cp.signature, checkpoint_bytes(cp.seq, cp.hash, cp.at)
                )
            except (InvalidSignature, ValueError):
                forged.append(cp.seq)
                continue
            if trusted.get(cp.seq, cp.hash) != cp.hash:
                forged.append(cp.seq)
            trusted[cp.seq] = cp.hash
        return trusted, forged

    def append(self, seq: int, head_hash: str, at: datetime) -> Checkpoint | None:
        """Sign and append the head, unless it is the one signed last."""
        if seq == 0 or self._last == (seq, head_hash):
            return None
        key_id, signature = self._keys.sign(checkpoint_bytes(seq, head_hash, at))
        cp = Checkpoint(seq, head_hash, at, key_id, signature)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(json.dumps(cp.line()) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._last = (seq, head_hash)
        return cp

    async def run(self, head: object, clock: Clock, interval: float) -> None:
        """Every `interval` seconds, checkpoint the head (`head()` -> (seq, hash)) if it moved."""
        while True:
            seq, head_hash = head()  # type: ignore[operator]
            await asyncio.to_thread(self.append, seq, head_hash, clock.now())
            await clock.sleep(interval)
