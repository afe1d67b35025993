"""Break-glass codes outlive signing-key rotations on the coordinator's side: each code's key is
recorded at issue, and a Welcome announces to an agent the retired keys of its usable codes
(Welcome.breakglass_keys), each until the last of those codes expires, signed apart from the
command keys (docs/wire.md, "Break-glass codes")."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

import jitmesh
from jitmesh.clock import FakeClock
from jitmesh.keyset import breakglass_keys_bytes, key_entries
from jitmesh.types import BreakglassCode
from jitmesh.v1 import agentlink_pb2, breakglass_pb2
from server.domain.breakglass import key_ends
from server.domain.models import IssuedCode, LiveCodes
from server.signing import ROTATION_OVERLAP, SigningKeys
from tests.server.helpers import T0, Env, agent_link

DAY = timedelta(days=1)


def ts(at: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(at)
    return out


def key_of(text: str) -> str:
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return breakglass_pb2.BreakglassCode.FromString(raw).key_id


def breakglass_list(welcome: agentlink_pb2.Welcome) -> list[tuple[str, datetime]]:
    """The announced break-glass keys, once their signature is checked under the key that
    signed the Welcome's key list (bound to the agent and the Welcome's time)."""
    announcer = next(k for k in welcome.signing_keys if k.key_id == welcome.keys_key_id)
    Ed25519PublicKey.from_public_bytes(announcer.public_key).verify(
        welcome.breakglass_keys_signature,
        breakglass_keys_bytes(
            key_entries(welcome.breakglass_keys),
            agent=welcome.agent,
            at_ms=welcome.coordinator_time.ToMilliseconds(),
        ),
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


def use_of(text: str, agent_now: datetime) -> agentlink_pb2.BreakglassUse:
    """The use an agent would report for the code `text`, made at `agent_now`."""
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    body = breakglass_pb2.BreakglassGrant.FromString(
        breakglass_pb2.BreakglassCode.FromString(raw).body
    )
    return agentlink_pb2.BreakglassUse(
        code_id=body.code_id,
        code=raw,
        grant_id="bg-" + body.code_id,
        subject=body.subject,
        action=body.action,
        used_at=ts(agent_now),
        not_after=ts(agent_now + timedelta(minutes=5)),
        caller=body.subject,
    )


def forged(env: Env, key_id: str, code_id: str, agent: str) -> str:
    """A code that no admin issued, signed by `key_id` (as whoever stole that key could)."""
    body = breakglass_pb2.BreakglassGrant(
        code_id=code_id,
        agent=agent,
        subject="mallory",
        action="shell",
        duration=Duration(seconds=600),
        issued_at=ts(T0),
        expires_at=ts(T0 + 30 * DAY),
        issued_by="admin",
    ).SerializeToString()
    signature = env.coordinator.keys.sign_with(key_id, b"jitmesh-breakglass/v1\n" + body)
    code = breakglass_pb2.BreakglassCode(body=body, key_id=key_id, signature=signature)
    return base64.urlsafe_b64encode(code.SerializeToString()).decode().rstrip("=")


async def test_a_compromised_key_is_trusted_for_nothing_and_its_codes_are_void(
    env: Env, clock: FakeClock
) -> None:
    db_codes = await env.admin.issue_breakglass_codes(
        "db-1", "shell", "alice", timedelta(minutes=30), valid_for=7 * DAY, count=2
    )
    web_code = await env.admin.issue_breakglass_codes(
        "web-1", "logs", "alice", timedelta(minutes=30), valid_for=7 * DAY
    )
    old = key_of(db_codes[0][1])
    # One code was used before the leak: it stays as it was.
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(
            agentlink_pb2.AgentMessage(
                hello=agentlink_pb2.Hello(
                    agent="db-1", version=jitmesh.__version__, boot_id="b1",
                    breakglass=[use_of(db_codes[1][1], T0)],
                )
            )
        )  # fmt: skip
        await link.next("welcome")
    await clock.advance(timedelta(minutes=1))

    new = await env.coordinator.rotate_signing_key(compromised=True)

    # At once, within what would be the overlap: the leaked key is announced for nothing, and
    # the announcement itself is signed by the new key (agents that pinned only the leaked key
    # cannot take it: they must enroll again).
    db = await welcome(env, "db-1")
    assert [k.key_id for k in db.signing_keys] == [new]
    assert db.keys_key_id == new
    assert breakglass_list(db) == []
    # Not even once the overlap is past (a code it signed would otherwise bring it back).
    await clock.advance(ROTATION_OVERLAP + timedelta(hours=1))
    assert breakglass_list(await welcome(env, "db-1")) == []

    # The unused codes it signed are void (listed as such), each audited once.
    codes = {c.id: c for c in await env.admin.list_breakglass_codes(include_expired=True)}
    unused = [db_codes[0][0].id, web_code[0][0].id]
    assert all(codes[i].voided_at is not None for i in unused)
    assert codes[db_codes[1][0].id].voided_at is None
    voided = await env.admin.list_audit(kind="breakglass.voided")
    assert sorted(e.details["code_id"] for e in voided) == sorted(unused)
    assert {(e.agent, e.details["key_id"], e.actor) for e in voided} == {
        ("db-1", old, "rotate-signing-key"),
        ("web-1", old, "rotate-signing-key"),
    }

    # A use of a voided code, or of any code the leaked key signed, is never adopted.
    uses = [
        use_of(db_codes[0][1], clock.now()),
        use_of(forged(env, old, "f" * 32, "db-1"), clock.now()),
    ]
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(
            agentlink_pb2.AgentMessage(
                hello=agentlink_pb2.Hello(
                    agent="db-1", version=jitmesh.__version__, boot_id="b1", breakglass=uses
                )
            )
        )
        await link.next("welcome")
    refused = {
        e.details["code_id"]: e.details["why"]
        for e in await env.admin.list_audit(kind="breakglass.refused")
    }
    assert refused == {
        db_codes[0][0].id: "the code was voided (its signing key was compromised)",
        "f" * 32: "the code is signed by a compromised key",
    }
    grants = {g.id for g in await env.admin.list_grants(agent="db-1")}
    assert "bg-" + db_codes[1][0].id in grants
    assert "bg-" + db_codes[0][0].id not in grants
    assert "bg-" + "f" * 32 not in grants
    assert (await env.admin.verify_audit()).ok


def test_a_compromised_key_signs_nothing_and_is_announced_for_nothing(tmp_path: Path) -> None:
    keys = SigningKeys.open(tmp_path, T0)
    leaked = keys.current()[0]
    new = keys.rotate(T0 + DAY, compromised=True)
    now = T0 + DAY + timedelta(minutes=1)  # within the overlap
    assert [k.key_id for k in keys.public_keys(now)] == [new]
    assert keys.sign_with_oldest(b"x", now)[0] == new
    assert keys.breakglass_keys({leaked: T0 + 9 * DAY}, now) == []
    assert keys.compromised(leaked)
    assert not keys.compromised(new)
    # Still on file for old audit checkpoints, and it stays compromised across a reload.
    assert leaked in {k.key_id for k in keys.public_keys(now, all_keys=True)}
    again = SigningKeys.open(tmp_path, now)
    assert again.compromised(leaked)
    # A later ordinary rotation leaves it compromised and the retired new key announced.
    newer = again.rotate(now)
    assert again.compromised(leaked)
    assert not again.compromised(new)
    assert [k.key_id for k in again.public_keys(now)] == [new, newer]


def test_the_compromise_rotation_command_voids_codes_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.__main__ import main
    from server.app import open_store

    now = datetime.now(UTC)
    leaked = SigningKeys.open(tmp_path, now).current()[0]

    async def issue() -> None:
        store = await open_store(tmp_path)
        try:
            async with store.transaction() as tx:
                await tx.insert_breakglass_codes(
                    [
                        IssuedCode(
                            BreakglassCode(
                                id=str(n) * 32, agent=agent, subject="alice", action="shell",
                                duration=timedelta(minutes=5), issued_at=now, issued_by="admin",
                                expires_at=now + DAY,
                            ),
                            f"sha-{n}",
                            leaked,
                        )
                        for n, agent in ((1, "db-1"), (2, "db-1"), (3, "web-1"))
                    ]
                )  # fmt: skip
        finally:
            await store.close()

    async def voided() -> list[str]:
        store = await open_store(tmp_path)
        try:
            async with store.transaction() as tx:
                codes = [await tx.get_breakglass_code(str(n) * 32) for n in (1, 2, 3)]
            return [c.id[0] for c in codes if c is not None and c.voided_at is not None]
        finally:
            await store.close()

    asyncio.run(issue())
    assert main(["rotate-signing-key", "--data", str(tmp_path), "--compromised"]) == 0
    out = capsys.readouterr().out
    assert f"compromised key {leaked}" in out
    assert "voided 3 unused break-glass code(s)" in out
    assert "on 2 agent(s): db-1, web-1" in out
    assert "until you enroll it again" in out
    new = out.split()[-1]
    keys = SigningKeys.open(tmp_path, now)
    assert keys.compromised(leaked)
    assert [k.key_id for k in keys.public_keys(now)] == [new]
    assert asyncio.run(voided()) == ["1", "2", "3"]


async def test_the_break_glass_list_is_signed_for_its_agent_and_instant(
    env: Env, clock: FakeClock
) -> None:
    await env.admin.issue_breakglass_codes(
        "db-1", "shell", "alice", timedelta(minutes=30), valid_for=7 * DAY
    )
    await env.coordinator.rotate_signing_key()
    await clock.advance(timedelta(minutes=5))
    db = await welcome(env, "db-1")
    assert db.coordinator_time.ToDatetime(T0.tzinfo) == clock.now()
    assert len(breakglass_list(db)) == 1
    announcer = next(k for k in db.signing_keys if k.key_id == db.keys_key_id)
    entries = key_entries(db.breakglass_keys)
    at_ms = db.coordinator_time.ToMilliseconds()
    # The same list for another agent, or at another instant, is other bytes.
    for other in (
        breakglass_keys_bytes(entries, agent="web-1", at_ms=at_ms),
        breakglass_keys_bytes(entries, agent="db-1", at_ms=at_ms - 1),
    ):
        with pytest.raises(InvalidSignature):
            Ed25519PublicKey.from_public_bytes(announcer.public_key).verify(
                db.breakglass_keys_signature, other
            )
