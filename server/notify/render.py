"""What a notice says, in each receiver's format: plain text, HTML, JSON and Slack Block Kit."""

from __future__ import annotations

import html
from typing import Any

from jitmesh.clock import rfc3339, to_ms
from server.domain.notices import Notice, NoticeKind

from .base import Links

# Slack action ids of the two buttons: the interaction endpoint acts only on these.
APPROVE = "jitmesh_approve"
DENY = "jitmesh_deny"


def summary(notice: Notice) -> str:
    """One line: who, what, where."""
    who = notice.subject or notice.actor
    what = notice.action or notice.details.get("target", "")
    where = f" on {notice.agent}" if notice.agent else ""
    return f"{notice.title}: {who} {what}{where}".rstrip()


def facts(notice: Notice) -> list[tuple[str, str]]:
    """The notice's labelled facts, in a fixed order, leaving out empty ones."""
    rows = [
        ("Requester", notice.subject),
        ("Action", notice.action),
        ("Agent", notice.agent),
        ("Duration", notice.details.get("duration", "")),
        ("Reason", notice.details.get("reason", "") or notice.details.get("why", "")),
        ("Ticket", notice.details.get("ticket", "")),
        (
            "Stage passed",
            notice.details.get("stage", "") if notice.kind.value.endswith("stage_approved") else "",
        ),
        ("Next stage", notice.details.get("next_stage", "")),
        ("By", notice.actor),
        ("Request", notice.request_id),
        ("Grant", notice.grant_id),
    ]
    return [(k, v) for k, v in rows if v]


def text(notice: Notice, links: Links) -> str:
    lines = [summary(notice), ""]
    lines += [f"{k}: {v}" for k, v in facts(notice)]
    link = links.request(notice.request_id)
    if link:
        lines += ["", f"Open: {link}"]
    return "\n".join(lines) + "\n"


def html_body(notice: Notice, links: Links) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><th align='left'>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts(notice)
    )
    link = links.request(notice.request_id)
    open_link = f"<p><a href='{e(link)}'>Open the request</a></p>" if link else ""
    return (
        f"<!doctype html><html><body><h2>{e(summary(notice))}</h2>"
        f"<table>{rows}</table>{open_link}</body></html>"
    )


def json_body(notice: Notice, links: Links) -> dict[str, Any]:
    """The webhook body (docs/notifications.md lists its fields)."""
    return {
        "id": notice.id,
        "kind": notice.kind.value,
        "title": notice.title,
        "at": rfc3339(notice.at),
        "at_ms": to_ms(notice.at),
        "actor": notice.actor,
        "subject": notice.subject,
        "agent": notice.agent,
        "action": notice.action,
        "request_id": notice.request_id,
        "grant_id": notice.grant_id,
        "details": dict(notice.details),
        "link": links.request(notice.request_id),
    }


def slack_blocks(notice: Notice, links: Links, *, buttons: bool) -> list[dict[str, Any]]:
    """Block Kit: a header, the facts, a link, and Approve/Deny for approvers."""
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": notice.title[:150]}},
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": _mrkdwn(summary(notice))},
            "fields": [
                {"type": "mrkdwn", "text": f"*{k}*\n{_mrkdwn(v)}"} for k, v in facts(notice)[:10]
            ],
        },
    ]
    link = links.request(notice.request_id)
    if link:
        blocks.append(
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": f"<{link}|Open the request>"}],
            }
        )
    if buttons and notice.kind in (NoticeKind.REQUEST_CREATED, NoticeKind.STAGE_APPROVED):
        blocks.append(
            {
                "type": "actions",
                "block_id": "jitmesh_review",
                "elements": [
                    {
                        "type": "button",
                        "action_id": APPROVE,
                        "style": "primary",
                        "text": {"type": "plain_text", "text": "Approve"},
                        "value": notice.request_id,
                    },
                    {
                        "type": "button",
                        "action_id": DENY,
                        "style": "danger",
                        "text": {"type": "plain_text", "text": "Deny"},
                        "value": notice.request_id,
                    },
                ],
            }
        )
    return blocks


def _mrkdwn(value: str) -> str:
    # Slack's own escaping: these three characters are markup in mrkdwn.
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
