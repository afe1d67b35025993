"""The audit hash chain: a valid chain verifies; every kind of tampering is named at its seq."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import timedelta

from jitmesh.types import AuditEvent
from server.domain.audit import GENESIS, ChainVerifier, event_hash, reference_hash, verify_chain
from server.domain.models import new_id
from tests.server.helpers import T0


def chain(n: int = 8) -> list[AuditEvent]:
    events: list[AuditEvent] = []
    prev = GENESIS
    for seq in range(1, n + 1):
        event = AuditEvent(
            seq=seq,
            id=new_id("evt"),
            at=T0 + timedelta(seconds=seq),
            actor="alice",
            kind="request.created",
            subject="alice",
            agent="web-1",
            request_id="",
            grant_id="",
            details={"n": str(seq), "reason": "release ✓"},
            prev_hash=prev,
            hash="",
        )
        event = replace(event, hash=event_hash(event))
        events.append(event)
        prev = event.hash
    return events


def rehash(event: AuditEvent) -> AuditEvent:
    return replace(event, hash=event_hash(event))


def test_valid_chain_verifies() -> None:
    events = chain()
    result = verify_chain(events)
    assert result.ok
    assert result.events_checked == len(events)
    assert result.first_bad_seq == 0
    assert result.problem == ""
    assert result.head_hash == events[-1].hash


def test_empty_chain_verifies_with_the_genesis_head() -> None:
    result = verify_chain([])
    assert result.ok
    assert result.head_hash == GENESIS


def test_hash_covers_every_field() -> None:
    event = chain(1)[0]
    changes = [
        {"seq": 2},
        {"id": "evt-other"},
        {"at": event.at + timedelta(milliseconds=1)},
        {"actor": "mallory"},
        {"kind": "request.approved"},
        {"subject": "bob"},
        {"agent": "web-2"},
        {"request_id": "req-1"},
        {"grant_id": "grt-1"},
        {"details": {**event.details, "n": "2"}},
        {"prev_hash": "f" * 64},
    ]
    for change in changes:
        assert event_hash(replace(event, **change)) != event.hash, change  # type: ignore[arg-type]


def test_details_order_does_not_matter() -> None:
    event = chain(1)[0]
    reordered = replace(event, details=dict(reversed(list(event.details.items()))))
    assert event_hash(reordered) == event.hash


def test_modified_entry() -> None:
    events = chain()
    events[3] = replace(events[3], details={"n": "4", "reason": "nothing to see"})
    result = verify_chain(events)
    assert not result.ok
    assert result.first_bad_seq == 4
    assert "modified" in result.problem
    assert result.events_checked == 3


def test_modified_and_rehashed_entry_breaks_the_next_link() -> None:
    events = chain()
    events[3] = rehash(replace(events[3], actor="mallory"))
    result = verify_chain(events)
    assert result.first_bad_seq == 5
    assert "previous-hash link" in result.problem


def test_deleted_entry() -> None:
    events = chain()
    del events[2]
    result = verify_chain(events)
    assert not result.ok
    assert result.first_bad_seq == 3
    assert "sequence gap: expected 3, found 4" in result.problem


def test_deleted_entry_with_renumbering() -> None:
    events = chain()
    del events[2]
    events = events[:2] + [replace(e, seq=e.seq - 1) for e in events[2:]]
    result = verify_chain(events)
    assert result.first_bad_seq == 3
    assert "previous-hash link" in result.problem


def test_inserted_entry() -> None:
    events = chain()
    forged = rehash(
        replace(events[2], id=new_id("evt"), kind="grant.revoked", prev_hash=events[2].hash)
    )
    # Inserted after seq 3 without renumbering: a second entry numbered 3.
    events.insert(3, forged)
    result = verify_chain(events)
    assert result.first_bad_seq == 4
    assert "expected 4, found 3" in result.problem


def test_inserted_entry_with_renumbering() -> None:
    events = chain()
    # A forger who links the new entry to seq 3 and renumbers what follows: the entry itself
    # is consistent, so the first bad entry is the old 4, now numbered 5, whose link is broken.
    forged = rehash(
        replace(events[2], seq=4, id=new_id("evt"), kind="grant.revoked", prev_hash=events[2].hash)
    )
    events = events[:3] + [forged] + [replace(e, seq=e.seq + 1) for e in events[3:]]
    result = verify_chain(events)
    assert result.first_bad_seq == 5
    assert "previous-hash link" in result.problem
    assert result.events_checked == 4


def test_reordered_entries() -> None:
    events = chain()
    events[4], events[5] = events[5], events[4]
    result = verify_chain(events)
    assert result.first_bad_seq == 5
    assert "expected 5, found 6" in result.problem


def test_reordered_entries_with_renumbering() -> None:
    events = chain()
    a, b = events[4], events[5]
    events[4], events[5] = replace(b, seq=5), replace(a, seq=6)
    result = verify_chain(events)
    assert result.first_bad_seq == 5
    assert "previous-hash link" in result.problem


def test_truncated_middle() -> None:
    events = chain(10)
    events = events[:3] + events[7:]
    result = verify_chain(events)
    assert result.first_bad_seq == 4
    assert "expected 4, found 8" in result.problem
    assert result.events_checked == 3


def test_truncated_tail_shows_in_the_head_hash() -> None:
    # A chain cut at its end is still a valid chain; only the head, kept elsewhere, tells.
    events = chain()
    result = verify_chain(events[:5])
    assert result.ok
    assert result.head_hash != events[-1].hash
    assert result.head_hash == events[4].hash


def test_first_entry_must_link_to_genesis() -> None:
    events = chain()
    events[0] = rehash(replace(events[0], prev_hash="1" * 64))
    result = verify_chain(events)
    assert result.first_bad_seq == 1


def test_verifier_stops_at_the_first_problem() -> None:
    events = chain()
    events[1] = replace(events[1], actor="mallory")
    events[5] = replace(events[5], actor="mallory")
    verifier = ChainVerifier()
    fed = [verifier.feed(e) for e in events]
    assert fed == [True, False, False, False, False, False, False, False]
    assert verifier.result().first_bad_seq == 2


def test_fast_hash_is_the_generic_canonical_json() -> None:
    # The hash assembles the canonical text itself; it must be byte for byte what the generic
    # encoder (the definition) gives, for any text: quotes, backslashes, control characters,
    # non-ASCII, separators in values, and details in any key order or with non-string values.
    rng = random.Random(7)
    alphabet = 'ab"\\/\n\t\x00\x1f\x7f é✓\u2028\U0001f600,:{}[]'

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))

    base = chain(1)[0]
    for _ in range(500):
        details: dict[str, str] = {text(): text() for _ in range(rng.randrange(0, 4))}
        event = replace(
            base, seq=rng.randrange(1, 2**40), id=text(), actor=text(), kind=text(),
            subject=text(), agent=text(), request_id=text(), grant_id=text(),
            details=dict(reversed(list(details.items()))), prev_hash=text(),
        )  # fmt: skip
        assert event_hash(event) == reference_hash(event)
    odd = replace(base, details={"n": 3, "b": None})  # type: ignore[dict-item]
    assert event_hash(odd) == reference_hash(odd)
