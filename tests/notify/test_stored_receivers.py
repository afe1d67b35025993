"""Receivers stored by an earlier release read the way they worked then (`as_read`)."""

from __future__ import annotations

from datetime import UTC, datetime

from server.domain.receivers import ReceiverKind, ReceiverSpec, Route, as_read

AT = datetime(2026, 12, 1, tzinfo=UTC)
MAIL = {"host": "smtp.example", "sender": "jit@example"}


def spec(settings: dict[str, str], route: Route) -> ReceiverSpec:
    return ReceiverSpec("mail", ReceiverKind.EMAIL, settings, "", route, AT, "admin")


def test_an_email_receiver_for_requesters_only_keeps_telling_them_after_an_upgrade() -> None:
    # Before routes had `requester`, `requester_domain` without `to` meant: write to each
    # requester. Read with requesters off, it would have no recipient at all.
    old = spec({**MAIL, "requester_domain": "example"}, Route(kinds=("request.approved",)))
    assert as_read(old).route == Route(kinds=("request.approved",), requester=True)


def test_other_receivers_read_as_stored() -> None:
    team = spec({**MAIL, "to": "sre@example", "requester_domain": "example"}, Route())
    assert as_read(team) == team
    personal = spec({**MAIL, "requester_domain": "example"}, Route(requester=True))
    assert as_read(personal) == personal
    hook = ReceiverSpec("hook", ReceiverKind.WEBHOOK, {"url": "https://x"}, "", Route(), AT, "a")
    assert as_read(hook) == hook
