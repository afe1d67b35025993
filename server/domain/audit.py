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


# The canonical text is the compact JSON array of the fields (json.dumps with separators
# (",", ":") and ensure_ascii=False, details keys sorted). It is assembled here from the C
# string escaper rather than by the generic encoder: the same text at a third of the cost, which
# matters when a sweep hashes 100,000 events (tests/server/test_audit_chain.py compares both).
_CANONICAL = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_quote = json.encoder.encode_basestring


def checkpoint_bytes(seq: int, head_hash: str, at: datetime) -> bytes:
    """The exact bytes a checkpoint's signature covers."""
    return f"jitmesh-audit-checkpoint/v1\n{seq}\n{head_hash}\n{to_ms(at)}".encode()


def canonical_details(details: Mapping[str, str]) -> str:
    """The details object as it appears in the canonical text (keys sorted)."""
    items = sorted(details.items())
    if all(type(k) is str and type(v) is str for k, v in items):
        return "{" + ",".join(f"{_quote(k)}:{_quote(v)}" for k, v in items) + "}"
    return _CANONICAL(dict(items))


def chain_hash(
    seq: int, event_id: str, at_ms: int, actor: str, kind: str, subject: str, agent: str,
    request_id: str, grant_id: str, details: str, prev_hash: str,
) -> str:  # fmt: skip
    """SHA-256 of the canonical text, `details` already in canonical form."""
    q = _quote
    text = (
        f"[{int(seq)},{q(event_id)},{int(at_ms)},{q(actor)},{q(kind)},{q(subject)},{q(agent)},"
        f"{q(request_id)},{q(grant_id)},{details},{q(prev_hash)}]"
    )
    return hashlib.sha256(text.encode()).hexdigest()


def event_hash(event: AuditEvent) -> str:
    """SHA-256 over the canonical JSON of every field but the hash itself."""
    return chain_hash(
        event.seq, event.id, to_ms(event.at), event.actor, event.kind, event.subject,
        event.agent, event.request_id, event.grant_id, canonical_details(event.details),
        event.prev_hash,
    )  # fmt: skip


def reference_hash(event: AuditEvent) -> str:
    """`event_hash` through the generic JSON encoder: the definition the fast path must match."""
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
