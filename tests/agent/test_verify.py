"""`agent/rpc/verify.py`, the one place where a command's authenticity and freshness are checked:
each check on its own, on real Ed25519 signatures (the wire-level attacks are in
tests/security/test_signed_commands.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.domain.errors import MalformedCommand
from agent.rpc.verify import verify
from jitmesh.v1 import agentlink_pb2
from tests.agent.coordinator import KEY_ID, PUBLIC_KEY, SIGNING_KEY, command, grant_body
from tests.agent.factories import T0, gid

KEYS = {KEY_ID: PUBLIC_KEY}
LATER = T0 + timedelta(hours=1)


def signed(epoch: int = 7) -> agentlink_pb2.Command:
    return command(grant_body(1, gid(), T0, LATER, epoch=epoch)).command


@pytest.mark.parametrize("epoch", [7, 8])
def test_a_command_from_the_current_or_a_later_epoch_passes(epoch: int) -> None:
    body = verify(signed(epoch), KEYS, min_epoch=7)
    assert (body.epoch, body.seq, body.WhichOneof("kind")) == (epoch, 1, "grant")


def test_a_command_from_an_earlier_epoch_is_refused() -> None:
    with pytest.raises(MalformedCommand, match="earlier coordinator epoch"):
        verify(signed(6), KEYS, min_epoch=7)


def test_the_epoch_counts_only_after_the_signature() -> None:
    # A forged body claiming a newer epoch is refused for its signature, not let through.
    forged = signed(6)
    body = agentlink_pb2.CommandBody()
    body.ParseFromString(forged.body)
    body.epoch = 99
    forged.body = body.SerializeToString()
    with pytest.raises(MalformedCommand, match="signature is not valid"):
        verify(forged, KEYS, min_epoch=7)


def test_unknown_key_and_bad_signature_are_refused() -> None:
    good = signed()
    with pytest.raises(MalformedCommand, match="unknown key"):
        verify(good, {"other": PUBLIC_KEY}, min_epoch=0)
    attacker = Ed25519PrivateKey.generate()
    good.signature = attacker.sign(good.body)
    with pytest.raises(MalformedCommand, match="signature is not valid"):
        verify(good, KEYS, min_epoch=0)


def test_a_validly_signed_body_that_does_not_parse_is_refused() -> None:
    junk = b"\xff\xff\xff"
    message = agentlink_pb2.Command(
        seq=1, body=junk, key_id=KEY_ID, signature=SIGNING_KEY.sign(junk)
    )
    with pytest.raises(MalformedCommand, match="does not parse"):
        verify(message, KEYS, min_epoch=0)
