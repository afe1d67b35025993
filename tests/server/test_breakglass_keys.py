"""Break-glass codes outlive signing-key rotations on the coordinator's side: each code's key is
recorded at issue, and a Welcome announces to an agent the retired keys of its usable codes
(Welcome.breakglass_keys), each until the last of those codes expires, signed apart from the
command keys (docs/wire.md, "Break-glass codes")."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from jitmesh.clock import FakeClock
from jitmesh.keyset import breakglass_keys_bytes, key_entries
from jitmesh.v1 import agentlink_pb2, breakglass_pb2
from server.domain.breakglass import key_ends
from server.domain.models import LiveCodes
from server.signing import ROTATION_OVERLAP, SigningKeys
from tests.server.helpers import T0, Env, agent_link

DAY = timedelta(days=1)


def key_of(text: str) -> str:
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return breakglass_pb2.BreakglassCode.FromString(raw).key_id


def breakglass_list(welcome: agentlink_pb2.Welcome) -> list[tuple[str, datetime]]:
    """The announced break-glass keys, once their signature is checked under the key that
    signed the Welcome's key list."""
    announcer = next(k for k in welcome.signing_keys if k.key_id == welcome.keys_key_id)
    Ed25519PublicKey.from_public_bytes(announcer.public_key).verify(
        welcome.breakglass_keys_signature,
        breakglass_keys_bytes(key_entries(welcome.breakglass_keys)),
    )
    return [(k.key_id, k.not_after.ToDatetime(T0.tzinfo)) for k in welcome.breakglass_keys]


async def welcome(env: Env, agent: str) -> agentlink_pb2.Welcome:
    async with agent_link(env.address, env.credentials[agent]) as link:
        return await link.hello(agent)


async def test_a_retired_key_is_announced_until_its_last_usable_code_expires(
    env: Env, clock: FakeClock
) -> None:
    issued = await env.admin.issue_breakglass_codes(
        "db-1", "shell", "alice", timedelta(minutes=30), valid_for=7 * DAY, count=2
    )
    later = await env.admin.issue_breakglass_codes(
        "db-1", "logs", "alice", timedelta(minutes=30), valid_for=5 * DAY
    )
    old = key_of(issued[0][1])
    assert {key_of(text) for _, text in [*issued, *later]} == {old}
    assert breakglass_list(await welcome(env, "db-1")) == []  # nothing retired yet

    new = await env.coordinator.rotate_signing_key()
    await clock.advance(ROTATION_OVERLAP + timedelta(hours=1))
    db = await welcome(env, "db-1")
    # No longer a command key, but announced for codes, until the latest expiry of its codes.
    assert [k.key_id for k in db.signing_keys] == [new]
    assert breakglass_list(db) == [(old, T0 + 7 * DAY)]
    # The announced key is the one that verifies the code.
    raw = base64.urlsafe_b64decode(issued[0][1] + "=" * (-len(issued[0][1]) % 4))
    signed = breakglass_pb2.BreakglassCode.FromString(raw)
    Ed25519PublicKey.from_public_bytes(db.breakglass_keys[0].public_key).verify(
        signed.signature, b"jitmesh-breakglass/v1\n" + signed.body
    )
    # An agent without codes gets a signed empty list (it drops any key it kept).
    assert breakglass_list(await welcome(env, "web-1")) == []

    # Once its codes have expired, the key is no longer announced.
    await clock.advance(7 * DAY)
    assert breakglass_list(await welcome(env, "db-1")) == []


def test_key_ends_take_the_latest_expiry_per_agent_and_key() -> None:
    def live(agent: str, key_id: str, first: int, last: int, ends: int) -> LiveCodes:
        return LiveCodes(agent, key_id, T0 + first * DAY, T0 + last * DAY, T0 + ends * DAY)

    windows = {"k1": (T0, T0 + 10 * DAY), "k2": (T0 + 10 * DAY, T0 + 99 * DAY)}

    def current_then(first: datetime, last: datetime) -> list[str]:
        return [k for k, (start, end) in windows.items() if start <= last and end > first]

    ends = key_ends(
        [
            live("db-1", "k1", 0, 1, 7),
            live("web-1", "k1", 2, 2, 3),
            # Keys not recorded (issued before migration 0008): the keys current then.
            live("db-1", "", 9, 11, 20),
            live("web-1", "", 12, 12, 14),
        ],
        current_then,
    )
    assert ends == {
        "db-1": {"k1": T0 + 20 * DAY, "k2": T0 + 20 * DAY},
        "web-1": {"k1": T0 + 3 * DAY, "k2": T0 + 14 * DAY},
    }


def test_signing_keys_say_which_were_current_and_announce_only_retired_ones(
    tmp_path: Path,
) -> None:
    keys = SigningKeys.open(tmp_path, T0)
    assert not keys.retired()
    first = keys.public_keys(T0)[0].key_id
    second = keys.rotate(T0 + 10 * DAY)
    assert keys.retired()
    assert keys.signed_between(T0, T0 + DAY) == [first]
    assert keys.signed_between(T0 + 9 * DAY, T0 + 11 * DAY) == [first, second]
    assert keys.signed_between(T0 + 10 * DAY, T0 + 12 * DAY) == [second]
    ends = {first: T0 + 30 * DAY, second: T0 + 40 * DAY, "unknown": T0 + 50 * DAY}
    announced = keys.breakglass_keys(ends, T0 + 20 * DAY)
    assert [(k.key_id, k.not_after) for k in announced] == [(first, T0 + 30 * DAY)]
    assert keys.breakglass_keys(ends, T0 + 30 * DAY) == []
