"""Break-glass on the agent without processes: the pure decision for every refusal, the code's
edge (signature under the pinned keys, nothing echoed), and the store's once-only use."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from agent.domain.breakglass import (
    BreakglassKey,
    Code,
    KeptLock,
    Refused,
    Use,
    code_keys,
    decide_use,
    grant_id_of,
)
from agent.domain.leases import EventKind, Lease, LeaseState, new_event
from agent.rpc.breakglass import SIGNED_PREFIX, BadCode, read_code
from agent.store.memory import MemoryLeaseStore
from agent.store.sqlite import SqliteLeaseStore
from jitmesh.v1 import breakglass_pb2

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
CODE = Code(
    code_id="a" * 32,
    agent="db-1",
    subject="alice",
    action="shell",
    duration=timedelta(minutes=30),
    issued_at=NOW - timedelta(days=1),
    expires_at=NOW + timedelta(days=6),
    issued_by="admin",
    raw=b"signed",
)


def decide(code: Code = CODE, /, **how: object) -> Refused | tuple[Lease, Use]:
    args: dict[str, object] = {
        "own_name": "db-1",
        "caller": "alice",
        "caller_is_root": False,
        "now": NOW,
        "already_used": False,
        "lease_taken": False,
        "locks": (),
        "cap": timedelta(hours=1),
    }
    args.update(how)
    return decide_use(code, **args)  # type: ignore[arg-type]


def test_a_valid_code_gives_a_capped_lease_applied_now() -> None:
    result = decide(cap=timedelta(minutes=10))
    assert not isinstance(result, Refused)
    lease, use = result
    assert lease.grant_id == "bg-" + "a" * 32
    assert (lease.not_before, lease.not_after, lease.applied_at) == (
        NOW,
        NOW + timedelta(minutes=10),
        NOW,
    )
    assert lease.state is LeaseState.ACTIVE
    assert (use.caller, use.code) == ("alice", b"signed")


def test_root_may_present_anyone_s_code() -> None:
    assert not isinstance(decide(caller="root", caller_is_root=True), Refused)


@pytest.mark.parametrize(
    ("how", "why"),
    [
        ({"own_name": "web-1"}, "another host"),
        ({"caller": "bob"}, "for alice"),
        ({"caller": None}, "for alice"),
        ({"now": CODE.expires_at}, "expired"),
        ({"now": CODE.issued_at - timedelta(hours=1)}, "not valid yet"),
        ({"already_used": True}, "used already"),
        ({"lease_taken": True}, "used already"),
        ({"locks": [KeptLock("lck-1", subject="alice", reason="INC-9")]}, "INC-9"),
        ({"locks": [KeptLock("lck-1", action="shell", reason="INC-9")]}, "INC-9"),
        ({"locks": [KeptLock("lck-1", reason="whole host")]}, "whole host"),
    ],
)
def test_refusals(how: dict[str, object], why: str) -> None:
    result = decide(**how)
    assert isinstance(result, Refused)
    assert why in result.reason


def test_locks_that_do_not_match_or_expired_do_not_refuse() -> None:
    locks = [
        KeptLock("lck-1", subject="bob"),
        KeptLock("lck-2", action="deploy"),
        KeptLock("lck-3", subject="alice", expires_at=NOW),
    ]
    assert not isinstance(decide(locks=locks), Refused)
    assert isinstance(decide(locks=[KeptLock("lck-4", subject="ALICE".lower())]), Refused)


def signed_code(key: SigningKey, key_id: str = "k1", **body: object) -> str:
    grant = breakglass_pb2.BreakglassGrant(
        code_id="b" * 32, agent="db-1", subject="alice", action="shell", issued_by="admin"
    )
    grant.duration.FromTimedelta(timedelta(minutes=30))
    grant.issued_at.FromDatetime(NOW)
    grant.expires_at.FromDatetime(NOW + timedelta(days=1))
    for name, value in body.items():
        setattr(grant, name, value)
    data = grant.SerializeToString()
    code = breakglass_pb2.BreakglassCode(
        body=data, key_id=key_id, signature=key.sign(SIGNED_PREFIX + data).signature
    )
    return base64.urlsafe_b64encode(code.SerializeToString()).decode().rstrip("=")


def test_read_code_checks_the_signature_under_pinned_keys() -> None:
    key = SigningKey.generate()
    pinned = {"k1": bytes(key.verify_key)}
    code = read_code(signed_code(key), pinned)
    assert (code.code_id, code.subject, code.duration) == ("b" * 32, "alice", timedelta(minutes=30))
    other = SigningKey.generate()
    for text in (signed_code(other), signed_code(key, key_id="k2"), "not a code", "", "A" * 5000):
        with pytest.raises(BadCode) as raised:
            read_code(text, pinned)
        assert text[:20] not in str(raised.value) or not text


def test_read_code_refuses_bad_contents_even_when_signed() -> None:
    key = SigningKey.generate()
    pinned = {"k1": bytes(key.verify_key)}
    for bad in ({"code_id": "short"}, {"subject": "not a user!"}, {"agent": "UPPER"}):
        with pytest.raises(BadCode):
            read_code(signed_code(key, **bad), pinned)


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_a_code_is_recorded_once(kind: str, tmp_path: Path) -> None:
    store = SqliteLeaseStore.open(tmp_path) if kind == "sqlite" else MemoryLeaseStore()
    try:
        result = decide()
        assert not isinstance(result, Refused)
        lease, use = result
        event = new_event(EventKind.BREAKGLASS_USED, at=NOW, lease=lease)
        assert await store.record_breakglass(lease, use, event)
        assert not await store.record_breakglass(lease, use, event)
        assert await store.breakglass_used(use.code_id)
        assert (await store.lease(lease.grant_id)) == lease
        assert [u.code_id for u in await store.breakglass_unadopted()] == [use.code_id]
        await store.breakglass_adopted([use.code_id])
        assert await store.breakglass_unadopted() == []
        assert [e.kind for e in await store.pending_events(10)] == ["breakglass.used"]
    finally:
        store.close()


def test_a_break_glass_grant_id_is_a_grant_id_everywhere() -> None:
    from jitmesh import validation

    grant_id = grant_id_of("c" * 32)
    assert validation.check_id(grant_id, "grant") == grant_id
    with pytest.raises(validation.ValidationError):
        validation.check_id(grant_id, "request")


def test_codes_verify_under_the_command_keys_and_the_break_glass_keys_still_valid() -> None:
    kept = {
        "retired": BreakglassKey(b"r" * 32, NOW + timedelta(days=6)),
        "ended": BreakglassKey(b"e" * 32, NOW),
    }
    assert code_keys({"current": b"c" * 32}, kept, NOW) == {
        "current": b"c" * 32,
        "retired": b"r" * 32,
    }
    assert code_keys({}, kept, NOW + timedelta(days=6)) == {}
