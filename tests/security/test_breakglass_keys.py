"""Break-glass codes across signing-key rotations, on the real agent: a scripted coordinator
announces retired keys for codes only (Welcome.breakglass_keys, docs/wire.md "Break-glass
codes"); the agent keeps them privately, verifies codes with them until their not_after by its
own clock, never a command, and ignores an announcement no pinned key signed."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.protobuf.duration_pb2 import Duration

from agent.local.client import ask
from jitmesh.keyset import breakglass_keys_bytes, key_entries, keys_bytes
from jitmesh.v1 import agentlink_pb2, agents_pb2, breakglass_pb2
from tests.agent.coordinator import (
    KEY_ID,
    PUBLIC_KEY,
    SIGNING_KEY,
    Coordinator,
    Session,
    grant_body,
    serving,
    ts,
)
from tests.agent.factories import T0, gid
from tests.security.test_signed_commands import APPLIED, REJECTED, Host, running

DAY = timedelta(days=1)
KEPT = "breakglass_keys.json"
CODE_PREFIX = b"jitmesh-breakglass/v1\n"
# Retired more than a day before T0 (past the rotation overlap): no longer a command key.
RETIRED = Ed25519PrivateKey.generate()
RETIRED_ID = "ed25519:retired"
# Retired too; the last code it signed expires an hour after T0.
SHORT = Ed25519PrivateKey.generate()
SHORT_ID = "ed25519:short"


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def announced(key_id: str, key: Ed25519PrivateKey, not_after: datetime) -> agents_pb2.SigningKey:
    return agents_pb2.SigningKey(key_id=key_id, public_key=raw(key), not_after=ts(not_after))


def welcome(
    breakglass: list[agents_pb2.SigningKey],
    signer: Ed25519PrivateKey = SIGNING_KEY,
    *,
    signature: bytes | None = None,
) -> agentlink_pb2.Welcome:
    """What a coordinator a day past a rotation announces: the current key for commands (the
    one the agent pinned at enrollment), and `breakglass` for codes, signed by `signer`."""
    command_keys = [agents_pb2.SigningKey(key_id=KEY_ID, public_key=PUBLIC_KEY)]
    return agentlink_pb2.Welcome(
        signing_keys=command_keys,
        keys_key_id=KEY_ID,
        keys_signature=SIGNING_KEY.sign(keys_bytes(key_entries(command_keys))),
        breakglass_keys=breakglass,
        breakglass_keys_signature=(
            signature
            if signature is not None
            else signer.sign(breakglass_keys_bytes(key_entries(breakglass)))
        ),
    )


def code(key: Ed25519PrivateKey, key_id: str, code_id: str, expires_at: datetime) -> str:
    grant = breakglass_pb2.BreakglassGrant(
        code_id=code_id,
        agent="web-1",
        subject="alice",
        action="shell",
        duration=Duration(seconds=600),
        issued_at=ts(T0 - 3 * DAY),
        expires_at=ts(expires_at),
        issued_by="admin",
    )
    data = grant.SerializeToString()
    signed = breakglass_pb2.BreakglassCode(
        body=data, key_id=key_id, signature=key.sign(CODE_PREFIX + data)
    )
    return base64.urlsafe_b64encode(signed.SerializeToString()).decode().rstrip("=")


async def present(host: Host, text: str) -> dict[str, Any]:
    """The code through the agent's socket, as `jitmesh-agent breakglass` sends it (as root)."""
    return await asyncio.to_thread(ask, host.state, {"method": "breakglass", "code": text})


def kept(host: Host) -> dict[str, Any]:
    path = host.state / KEPT
    return json.loads(path.read_text()) if path.exists() else {}


async def welcomed(coordinator: Coordinator, seq: int) -> Session:
    """The next stream, once the agent has handled its Welcome (it applies a command, sequence
    number `seq`, only after that)."""
    session = await coordinator.session()
    body = grant_body(seq, gid(), T0, T0 + timedelta(minutes=10), action="logs")
    assert (await session.command(body)).status == APPLIED
    return session


async def test_a_retired_key_announced_for_codes_verifies_codes_only(tmp_path: Path) -> None:
    host = Host(tmp_path)
    async with serving() as coordinator:
        coordinator.welcome_extra = welcome(
            [
                announced(RETIRED_ID, RETIRED, T0 + 6 * DAY),
                announced(SHORT_ID, SHORT, T0 + timedelta(hours=1)),
            ]
        )
        async with running(host, coordinator):
            session = await welcomed(coordinator, 1)
            assert set(kept(host)) == {RETIRED_ID, SHORT_ID}
            assert stat.S_IMODE((host.state / KEPT).stat().st_mode) == 0o600
            # Commands still verify only under the command keys.
            assert set(json.loads((host.state / "signing_keys.json").read_text())) == {KEY_ID}

            # A code signed before the rotation, by the retired key: granted at once.
            answer = await present(host, code(RETIRED, RETIRED_ID, "a" * 32, T0 + 6 * DAY))
            assert answer.get("ok"), answer
            assert answer["grant_id"] == "bg-" + "a" * 32
            assert "alice:shell" in host.pairs()

            # The same key never verifies a command.
            data = grant_body(2, gid(), T0, T0 + timedelta(minutes=10)).SerializeToString()
            session.send(
                agentlink_pb2.CoordinatorMessage(
                    command=agentlink_pb2.Command(
                        seq=2, body=data, key_id=RETIRED_ID, signature=RETIRED.sign(data)
                    )
                )
            )
            ack = await session.ack()
            assert (ack.status, ack.reason) == (REJECTED, "command is signed by an unknown key")
            assert "alice:deploy" not in host.pairs()

            # Past a key's not_after by the agent's clock, its codes are refused (even one whose
            # own expiry is later); the other key still verifies.
            await host.clock.advance(timedelta(hours=2))
            late = code(SHORT, SHORT_ID, "b" * 32, T0 + 6 * DAY)
            refused = await present(host, late)
            assert not refused.get("ok")
            assert "not issued by this host's coordinator" in refused["error"]
            assert late not in json.dumps(refused)
            answer = await present(host, code(RETIRED, RETIRED_ID, "c" * 32, T0 + 6 * DAY))
            assert answer.get("ok"), answer


async def test_the_coordinator_s_signed_list_replaces_the_kept_keys(tmp_path: Path) -> None:
    host = Host(tmp_path)
    async with serving() as coordinator:
        coordinator.welcome_extra = welcome(
            [
                announced(RETIRED_ID, RETIRED, T0 + 6 * DAY),
                # Already past: never kept.
                announced(SHORT_ID, SHORT, T0 - timedelta(seconds=1)),
            ]
        )
        async with running(host, coordinator):
            session = await welcomed(coordinator, 1)
            assert set(kept(host)) == {RETIRED_ID}
            # An older coordinator sends no list: the agent keeps what it has.
            coordinator.welcome_extra = None
            session.end()
            session = await welcomed(coordinator, 2)
            assert set(kept(host)) == {RETIRED_ID}
            # The codes were all used: the list comes signed and empty, and the key is gone.
            coordinator.welcome_extra = welcome([])
            session.end()
            await welcomed(coordinator, 3)
            assert kept(host) == {}
            refused = await present(host, code(RETIRED, RETIRED_ID, "a" * 32, T0 + 6 * DAY))
            assert "not issued by this host's coordinator" in refused["error"]
            assert host.pairs() == {"alice:logs"}


async def test_break_glass_keys_not_signed_by_a_pinned_key_are_ignored(tmp_path: Path) -> None:
    host = Host(tmp_path)
    attacker = Ed25519PrivateKey.generate()
    theirs = [announced("ed25519:attacker", attacker, T0 + 6 * DAY)]
    command_keys = [agents_pb2.SigningKey(key_id=KEY_ID, public_key=PUBLIC_KEY)]
    forgeries = [
        # Signed by a key the agent never pinned.
        welcome(theirs, attacker),
        # The genuine key list's signature, offered for the break-glass list: the lists are
        # signed under different prefixes, so it does not hold.
        welcome(theirs, signature=SIGNING_KEY.sign(keys_bytes(key_entries(theirs)))),
        # A genuine signature over another list.
        welcome(theirs, signature=SIGNING_KEY.sign(breakglass_keys_bytes(key_entries([])))),
    ]
    # And one that names the attacker's key as the announcing key (the agent has not pinned it).
    named = welcome(theirs, attacker)
    named.keys_key_id = "ed25519:attacker"
    named.keys_signature = attacker.sign(keys_bytes(key_entries(command_keys)))
    forgeries.append(named)
    async with serving() as coordinator, running(host, coordinator):
        session = None
        for seq, forged in enumerate(forgeries, start=1):
            coordinator.welcome_extra = forged
            if session is not None:
                session.end()
            session = await welcomed(coordinator, seq)
            assert kept(host) == {}, seq
            text = code(attacker, "ed25519:attacker", "d" * 32, T0 + 6 * DAY)
            refused = await present(host, text)
            assert "not issued by this host's coordinator" in refused["error"]
        assert "alice:shell" not in host.pairs()
