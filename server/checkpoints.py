"""Signed audit checkpoints, kept in the store (table `checkpoints`), so every coordinator
replica writes and reads the same list: each is the chain head (seq, hash) at a time, signed
with the coordinator's Ed25519 key over `server.domain.audit.checkpoint_bytes`. Export them
(`jitctl audit export`) somewhere the coordinator's host cannot write, and a rewrite of the whole
chain, or a cut-off tail, is caught even by someone holding the database.

An installation from before checkpoints moved into the store has them in
`DATA/audit_checkpoints.jsonl`: they are copied in once at start and the file is renamed
`audit_checkpoints.jsonl.imported`."""

from __future__ import annotations

import base64
import json
import logging
from datetime import datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from jitmesh.clock import Clock, from_ms
from server.domain.audit import checkpoint_bytes
from server.domain.models import Checkpoint
from server.domain.ports import Store
from server.signing import PublicKey, SigningKeys

log = logging.getLogger(__name__)
FILE_NAME = "audit_checkpoints.jsonl"

__all__ = ["Checkpoint", "Checkpoints"]


class Checkpoints:
    def __init__(self, store: Store, keys: SigningKeys) -> None:
        self._store = store
        self._keys = keys

    async def import_file(self, data_dir: Path) -> int:
        """Copy the checkpoints of an older installation's file into the store, once."""
        path = data_dir / FILE_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return 0
        count = 0
        for line in text.splitlines():
            try:
                item = json.loads(line)
                cp = Checkpoint(
                    int(item["seq"]),
                    str(item["hash"]),
                    from_ms(int(item["at_ms"])),
                    str(item["key_id"]),
                    base64.b64decode(item["signature"]),
                )
            except (ValueError, KeyError, TypeError):
                # An unreadable line is a forged one: keep it as such, at seq 0.
                cp = Checkpoint(0, "", from_ms(0), "", b"")
            await self._store.add_checkpoint(cp)
            count += 1
        path.rename(path.with_name(FILE_NAME + ".imported"))
        log.info("imported %d audit checkpoints from %s", count, path)
        return count

    async def read(self) -> list[Checkpoint]:
        return await self._store.checkpoints()

    def public_keys(self) -> list[PublicKey]:
        return self._keys.public_keys(None, all_keys=True)

    async def verified(self) -> tuple[dict[int, str], list[int]]:
        """(seq -> hash of checkpoints that verify, seqs of those that do not)."""
        keys = {k.key_id: k.public_raw for k in self._keys.public_keys(None, all_keys=True)}
        trusted: dict[int, str] = {}
        forged: list[int] = []
        for cp in await self.read():
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

    async def append(self, at: datetime) -> Checkpoint | None:
        """Sign the store's audit head and add it, unless it is the head signed last."""
        seq, head_hash = await self._store.audit_head()
        last = await self._store.last_checkpoint()
        if seq == 0 or (last is not None and (last.seq, last.hash) == (seq, head_hash)):
            return None
        key_id, signature = self._keys.sign(checkpoint_bytes(seq, head_hash, at))
        cp = Checkpoint(seq, head_hash, at, key_id, signature)
        await self._store.add_checkpoint(cp)
        return cp

    async def run(self, clock: Clock, interval: float) -> None:
        """Every `interval` seconds, checkpoint the head if it moved."""
        while True:
            await self.append(clock.now())
            await clock.sleep(interval)
