"""Command signatures: libsodium signs (the push path's cost), and the bytes are exactly
Ed25519's as `cryptography` computes and verifies them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from server.signing import SigningKeys

NOW = datetime(2026, 12, 6, 21, 0, tzinfo=UTC)


def test_signatures_are_ed25519_by_the_named_key(tmp_path: Path) -> None:
    keys = SigningKeys.open(tmp_path, NOW)
    current = keys._keys[-1]
    for data in (b"", b"x", bytes(range(256)) * 3):
        key_id, signature = keys.sign(data)
        assert key_id == current.key_id
        # Deterministic: the same signature `cryptography` makes, and it verifies.
        assert signature == current.private.sign(data)
        Ed25519PublicKey.from_public_bytes(current.public_raw).verify(signature, data)


def test_after_rotation_the_new_key_signs_and_the_oldest_announces(tmp_path: Path) -> None:
    keys = SigningKeys.open(tmp_path, NOW)
    first = keys._keys[-1]
    new_id = keys.rotate(NOW)
    reopened = SigningKeys.open(tmp_path, NOW)
    for store in (keys, reopened):
        key_id, signature = store.sign(b"command")
        assert key_id == new_id
        assert signature == store._keys[-1].private.sign(b"command")
        oldest_id, oldest_signature = store.sign_with_oldest(b"keys", NOW)
        assert oldest_id == first.key_id
        Ed25519PublicKey.from_public_bytes(first.public_raw).verify(oldest_signature, b"keys")
