"""The audit hash chain. Each event's hash covers its fields and the previous event's hash, so
changing, deleting, inserting or reordering an entry breaks the chain at that entry.

A chain alone cannot show that its tail was cut off, nor that someone with write access rewrote
it from the start with fresh hashes. Signed checkpoints close both gaps: the coordinator signs
(seq, hash, time) of its head every few seconds (`checkpoint_bytes`, Ed25519), kept outside the
database; verification requires every checkpoint's entry to exist with exactly that hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import datetime

from jitmesh.clock import to_ms
from jitmesh.types import AuditEvent, ChainVerification

GENESIS = "0" * 64


# One encoder for every hash: json.dumps with options builds a new encoder on each call.
_CANONICAL = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def checkpoint_bytes(seq: int, head_hash: str, at: datetime) -> bytes:
    """The exact bytes a checkpoint's signature covers."""
    return f"jitmesh-audit-checkpoint/v1\n{seq}\n{head_hash}\n{to_ms(at)}".encode()


def event_hash(event: AuditEvent) -> str:
    """SHA-256 over the canonical JSON of every field but the hash itself."""
    canonical = _CANONICAL(
        [
            event.seq,
            event.id,
            to_ms(event.at),
            event.actor,
            event.kind,
            event.subject,
            event.agent,
            event.request_id,
            event.grant_id,
            dict(sorted(event.details.items())),
            event.prev_hash,
        ]
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class ChainVerifier:
    """Walks the chain in order, one event at a time, and names the first entry that does not
    fit. Feeding stops being useful once `failure` is set."""

    def __init__(self, checkpoints: Mapping[int, str] | None = None) -> None:
        """`checkpoints`: seq -> head hash, from checkpoints whose signature was verified."""
        self.checkpoints = dict(checkpoints or {})
        self.expected_prev = GENESIS
        self.expected_seq = 1
        self.checked = 0
        self.failure: ChainVerification | None = None

    def feed(self, event: AuditEvent) -> bool:
        """Check one event; False once the chain is broken."""
        if self.failure is not None:
            return False
        problem = ""
        if event.seq != self.expected_seq:
            problem = (
                f"sequence gap: expected {self.expected_seq}, found {event.seq} "
                "(entries deleted or inserted)"
            )
        elif event.prev_hash != self.expected_prev:
            problem = (
                "previous-hash link broken (an entry before it deleted, inserted or reordered)"
            )
        elif event_hash(event) != event.hash:
            problem = "hash does not match contents (entry modified)"
        elif self.checkpoints.get(event.seq, event.hash) != event.hash:
            problem = "differs from the signed checkpoint at this entry (chain rewritten)"
        if problem:
            self.failure = ChainVerification(
                False, self.checked, self.expected_seq, problem, self.expected_prev
            )
            return False
        self.checked += 1
        self.expected_prev = event.hash
        self.expected_seq += 1
        return True

    def result(self) -> ChainVerification:
        if self.failure is not None:
            return self.failure
        last = max(self.checkpoints, default=0)
        if last >= self.expected_seq:
            return ChainVerification(
                False,
                self.checked,
                self.expected_seq,
                f"missing: a signed checkpoint covers entries up to {last} (chain truncated)",
                self.expected_prev,
            )
        return ChainVerification(True, self.checked, 0, "", self.expected_prev)


def verify_chain(
    events: Iterable[AuditEvent], checkpoints: Mapping[int, str] | None = None
) -> ChainVerification:
    verifier = ChainVerifier(checkpoints)
    for event in events:
        if not verifier.feed(event):
            break
    return verifier.result()
