"""Command signatures: libsodium signs (the push path's cost), and the bytes are exactly
Ed25519's as `cryptography` computes and verifies them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from jitmesh.v1 import agentlink_pb2
from server.domain.models import Command, CommandKind
from server.rpc import convert
from server.signing import SigningKeys
from tests.server.helpers import make_grant

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


def test_a_command_body_set_in_place_is_the_body_built_apart() -> None:
    """The revoke and unlock parts are set in place (convert.command_body): the signed bytes
    must be those of the sub-message built apart and copied in, an empty unlock (its lock row
    gone) and a revoke with the default reason included, or agents would read another kind."""
    grant = make_grant(request_id="req-1")
    now = datetime(2026, 1, 1, 12, 0, 0, 123000, tzinfo=UTC)
    for reason in ("", "revoked", "expired", "released", "locked", "unknown"):
        command = Command("web-1", 7, CommandKind.REVOKE, grant, reason)
        body = convert.command_body(command, 3, now, "replica-1")
        apart = agentlink_pb2.CommandBody(
            agent="web-1", epoch=3, seq=7, issued_at=convert.ts(now), replica="replica-1"
        )
        apart.revoke.CopyFrom(
            agentlink_pb2.RevokeCommand(grant_id=grant.id, reason=body.revoke.reason)
        )
        assert body.SerializeToString(deterministic=True) == apart.SerializeToString(
            deterministic=True
        )
    assert (
        convert.command_body(
            Command("web-1", 7, CommandKind.REVOKE, grant, "unknown"), 3, now
        ).revoke.reason
        == agentlink_pb2.REVOKE_REASON_REVOKED
    )
    for kind in (CommandKind.UNLOCK, CommandKind.LOCK):
        body = convert.command_body(Command("web-1", 8, kind, None), 3, now)
        assert body.WhichOneof("kind") == "unlock"
        apart = agentlink_pb2.CommandBody(agent="web-1", epoch=3, seq=8, issued_at=convert.ts(now))
        apart.unlock.CopyFrom(agentlink_pb2.UnlockCommand(lock_id=""))
        assert body.SerializeToString(deterministic=True) == apart.SerializeToString(
            deterministic=True
        )
