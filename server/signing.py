"""The coordinator's command-signing keys (Ed25519), kept in `DATA/signing_keys.json` (0600).

Every command sent to an agent is signed over the exact bytes of its serialized `CommandBody`
(agent, epoch, seq, issue time and the grant with its window), so the agent can check, before it
parses anything, that the coordinator it enrolled with produced those bytes for it.

Rotation adds a new key that signs from then on; the previous keys stay valid for verification
until `retired_at + ROTATION_OVERLAP`, so commands signed just before a rotation still verify.
Agents receive every valid public key at enrollment and pin them in their state directory.

Break-glass codes are signed by the current key too, but live up to 90 days: a retired key that
signed codes still usable is announced to their agents apart (`breakglass_keys`), valid until
the last of those codes expires, for codes only. Retired keys stay on file for good (old audit
checkpoints and adopted codes are verified with them); what agents trust each for ends as said.

A key retired because it leaked (`rotate(compromised=True)`) is trusted for nothing from then on
but old audit checkpoints: it signs nothing (not even the announcement of the new key, during
the overlap), is never announced to agents (commands or codes), and no code it signed is
adopted (docs/operations.md, "Rotating the signing key"; THREAT_MODEL.md).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from nacl.bindings import crypto_sign, crypto_sign_seed_keypair

SIGNATURE_BYTES = 64

ROTATION_OVERLAP = timedelta(days=1)
FILE_NAME = "signing_keys.json"


def key_id(public_raw: bytes) -> str:
    return "ed25519:" + hashlib.sha256(public_raw).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class PublicKey:
    key_id: str
    public_raw: bytes
    # None while the key is current; else the last instant a signature by it is accepted.
    not_after: datetime | None


@dataclass(frozen=True, slots=True)
class _Key:
    private: Ed25519PrivateKey
    created_at: datetime
    retired_at: datetime | None
    # Retired because it leaked: trusted for audit checkpoints only.
    compromised: bool = False
    # Derived from the private key once (every pushed command names its key).
    public_raw: bytes = field(init=False, repr=False)
    key_id: str = field(init=False)
    # The same key in libsodium's form: it signs every command (see `signature`).
    _sodium: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        raw = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        object.__setattr__(self, "public_raw", raw)
        object.__setattr__(self, "key_id", key_id(raw))
        seed = self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        object.__setattr__(self, "_sodium", crypto_sign_seed_keypair(seed)[1])

    def signature(self, data: bytes) -> bytes:
        """The Ed25519 signature of `data` by libsodium (PyNaCl, which the agent verifies
        with): about 21 us against 33 us through `cryptography` on this machine, once per
        command pushed. Ed25519 is deterministic, so the bytes are the same either way
        (tests/server/test_signing.py)."""
        return crypto_sign(data, self._sodium)[:SIGNATURE_BYTES]


class SigningKeys:
    """Loads or creates the signing keys; `sign` uses the newest."""

    def __init__(self, path: Path, keys: list[_Key]) -> None:
        self._path = path
        self._keys = keys

    @classmethod
    def open(cls, data_dir: Path, now: datetime) -> SigningKeys:
        path = data_dir / FILE_NAME
        keys: list[_Key] = []
        if path.exists():
            for item in json.loads(path.read_text(encoding="utf-8")):
                keys.append(
                    _Key(
                        Ed25519PrivateKey.from_private_bytes(base64.b64decode(item["private"])),
                        datetime.fromisoformat(item["created_at"]),
                        datetime.fromisoformat(item["retired_at"]) if item["retired_at"] else None,
                        bool(item.get("compromised", False)),
                    )
                )
        store = cls(path, keys)
        if not keys:
            store.rotate(now)
        return store

    def reload(self) -> None:
        """Read the keys file again (another replica rotated: the file now holds its keys)."""
        fresh = SigningKeys.open(self._path.parent, datetime.now(UTC))
        self._keys = fresh._keys

    def current(self) -> tuple[str, datetime]:
        """The current key's id and when it was made."""
        return self._keys[-1].key_id, self._keys[-1].created_at

    def rotate(self, now: datetime, *, compromised: bool = False) -> str:
        """Make a new key current; the old ones stay valid for verification for a while, except
        the current one when it is `compromised`: then it is trusted at once for nothing but
        old audit checkpoints (see the module's docstring)."""
        # Retired keys stay on file: commands no longer verify with them after the overlap
        # (`public_keys`), but audit checkpoints they signed must keep verifying.
        self._keys = [
            k
            if k.retired_at is not None
            else _Key(k.private, k.created_at, now, compromised or k.compromised)
            for k in self._keys
        ]
        new = _Key(Ed25519PrivateKey.generate(), now, None)
        self._keys.append(new)
        self._save()
        return new.key_id

    def sign(self, data: bytes) -> tuple[str, bytes]:
        current = self._keys[-1]
        return current.key_id, current.signature(data)

    def sign_with(self, key_id: str, data: bytes) -> bytes:
        """Sign with the key `key_id` (one `sign_with_oldest` chose: both announced lists of a
        Welcome are signed by the same key)."""
        return next(k for k in self._keys if k.key_id == key_id).signature(data)

    def sign_with_oldest(self, data: bytes, now: datetime) -> tuple[str, bytes]:
        """Sign with the oldest key still valid: the one every agent enrolled within the
        rotation overlap has pinned (used to announce a rotation)."""
        for k in self._keys:
            if k.compromised:
                continue
            if k.retired_at is None or k.retired_at + ROTATION_OVERLAP > now:
                return k.key_id, k.signature(data)
        return self.sign(data)

    def public_keys(
        self, now: datetime | None = None, *, all_keys: bool = False
    ) -> list[PublicKey]:
        """The keys valid now (for agents; never a compromised one), or with `all_keys` every
        key still on file (for checking old audit checkpoints)."""
        now = now or datetime.now(UTC)
        out = []
        for k in self._keys:
            if k.compromised and not all_keys:
                continue
            not_after = None if k.retired_at is None else k.retired_at + ROTATION_OVERLAP
            if all_keys or not_after is None or not_after > now:
                out.append(PublicKey(k.key_id, k.public_raw, not_after))
        return out

    def compromised(self, key_id: str) -> bool:
        """Whether `key_id` was retired because it leaked (nothing it signed is trusted)."""
        return any(k.compromised for k in self._keys if k.key_id == key_id)

    def retired(self) -> bool:
        """Whether any key was ever retired (without, no code can outlive its key)."""
        return any(k.retired_at is not None for k in self._keys)

    def signed_between(self, first: datetime, last: datetime) -> list[str]:
        """The keys that were current at some instant from `first` to `last`: those that may
        have signed what was signed then."""
        return [
            k.key_id
            for k in self._keys
            if k.created_at <= last and (k.retired_at is None or k.retired_at > first)
        ]

    def breakglass_keys(self, ends: Mapping[str, datetime], now: datetime) -> list[PublicKey]:
        """The retired keys in `ends` (key id -> the latest expiry of the usable break-glass
        codes it signed), each valid until that expiry, for codes only. The current key is left
        out (agents have it for commands, and so for codes); so are a compromised key and an end
        already past."""
        return [
            PublicKey(k.key_id, k.public_raw, ends[k.key_id])
            for k in self._keys
            if k.retired_at is not None
            and not k.compromised
            and k.key_id in ends
            and ends[k.key_id] > now
        ]

    def _save(self) -> None:
        items = [
            {
                "private": base64.b64encode(
                    k.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
                ).decode(),
                "created_at": k.created_at.isoformat(),
                "retired_at": k.retired_at.isoformat() if k.retired_at else None,
                **({"compromised": True} if k.compromised else {}),
            }
            for k in self._keys
        ]
        write_private(self._path, json.dumps(items, indent=1))


def write_private(path: Path, text: str | bytes) -> None:
    """Write a file created 0600 from the start, replaced atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
