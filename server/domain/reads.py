"""Who may read what: the read matrix of THREAT_MODEL.md ("Who reads what"), in one place.

    requests, grants   the requester: their own
                       an approver: requests whose approver groups they are in (so they may
                       review them, or could have), requests they reviewed, every request of a
                       subject with a pending request they may review (the history the web page
                       shows), and the grants of all of these
                       admins and auditors: all
    audit log          admins and auditors (list, tail, export, verify, checkpoints)
    locks              admins
    agents, policy     every signed-in operator (they are what one asks for, and by which rule)

Auditors are the groups the coordinator's configuration names (`--auditor-group`), never the
policy document: whoever may apply policy must not be able to grant themselves the audit log.
A request or grant the caller may not see is answered as not found, so ids reveal nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from jitmesh.clock import to_ms
from jitmesh.types import Grant, Request, RequestState

from .errors import PermissionDenied
from .models import Principal, same_person, user_name

# A scan for visible items stops after this many store rows and answers a shorter page with a
# page token (AIP-158 allows fewer items than asked), so one call stays bounded.
SCAN_LIMIT = 5000
# Pending requests looked at to find the subjects an approver may see the history of.
PENDING_LIMIT = 5000

T = TypeVar("T", Request, Grant)


@dataclass(frozen=True)
class Readers:
    """The configured auditor groups."""

    auditor_groups: frozenset[str] = frozenset()

    def reads_everything(self, principal: Principal) -> bool:
        return principal.kind == "user" and (
            principal.is_admin or bool(principal.groups & self.auditor_groups)
        )

    def require_audit_reader(self, principal: Principal) -> None:
        if not self.reads_everything(principal):
            raise PermissionDenied(
                "reading the audit log needs the admins group or an auditor group (named by "
                "the coordinator's --auditor-group)"
            )


@dataclass(frozen=True)
class View:
    """What one principal may see of requests and grants."""

    principal: Principal
    everything: bool
    # Subjects (normalized) with a pending request this principal may review.
    reviewable_subjects: frozenset[str] = field(default_factory=frozenset)

    def sees_request(self, request: Request) -> bool:
        if self.everything or same_person(self.principal.name, request.subject):
            return True
        if self.principal.groups.intersection(request.approver_groups):
            return True
        if any(same_person(r.reviewer, self.principal.name) for r in request.reviews):
            return True
        return user_name(request.subject) in self.reviewable_subjects

    def sees_grant(self, grant: Grant, request: Request | None) -> bool:
        if self.everything or same_person(self.principal.name, grant.subject):
            return True
        return request is not None and self.sees_request(request)


async def view_of(
    principal: Principal,
    readers: Readers,
    pending: Callable[[str, int], Awaitable[tuple[list[Request], str]]],
) -> View:
    """The principal's view; `pending(page_token, limit)` pages through pending requests."""
    if readers.reads_everything(principal):
        return View(principal, everything=True)
    if not principal.groups:
        return View(principal, everything=False)
    subjects: set[str] = set()
    token, seen = "", 0
    while seen < PENDING_LIMIT:
        page, token = await pending(token, 500)
        seen += len(page)
        subjects.update(
            user_name(r.subject)
            for r in page
            if r.state is RequestState.PENDING
            and principal.groups.intersection(r.approver_groups)
            and not same_person(principal.name, r.subject)
        )
        if not token:
            break
    return View(principal, everything=False, reviewable_subjects=frozenset(subjects))


def page_token_after(item: Request | Grant) -> str:
    """The page token that continues after `item` (newest first). Every store spells its tokens
    this way: creation time in epoch milliseconds, a colon, the id."""
    return f"{to_ms(item.created_at)}:{item.id}"


async def visible_page(
    fetch: Callable[[str, int], Awaitable[tuple[list[T], str]]],
    visible: Callable[[Sequence[T]], Awaitable[Iterable[bool]]],
    page_size: int,
    page_token: str,
) -> tuple[list[T], str]:
    """One page of at most `page_size` visible items, newest first, following the store's
    pages; a shorter page with a token when SCAN_LIMIT rows were looked at first."""
    kept: list[T] = []
    token, scanned = page_token, 0
    while True:
        rows, next_token = await fetch(token, page_size)
        scanned += len(rows)
        for row, shown in zip(rows, await visible(rows), strict=True):
            if not shown:
                continue
            kept.append(row)
            if len(kept) == page_size:
                more = row is not rows[-1] or bool(next_token)
                return kept, page_token_after(row) if more else ""
        if not next_token:
            return kept, ""
        if scanned >= SCAN_LIMIT:
            return kept, next_token
        token = next_token


__all__ = ["Readers", "View", "page_token_after", "view_of", "visible_page"]
