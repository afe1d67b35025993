"""jitctl breakglass ...: single-use emergency codes agents honour while cut off (admins)."""

from __future__ import annotations

from datetime import timedelta

import click

from jitmesh.cli import output
from jitmesh.cli.core import DURATION, Output, command, group
from jitmesh.client import Client
from jitmesh.durations import format_duration

breakglass = group(
    None,
    "breakglass",
    help="Break-glass codes: emergency access without the coordinator (admins).",
    examples=[
        "jitctl breakglass issue --agent db-1 --action shell --subject alice --duration 30m "
        "--valid-for 7d --reason 'on-call kit'",
        "jitctl breakglass list --unreviewed",
        "jitctl breakglass review ID --note 'INC-42: database outage, checked'",
    ],
)


@command(
    breakglass,
    "issue",
    help="Issue single-use codes, each shown once (the coordinator keeps only its hash).",
    examples=[
        "jitctl breakglass issue --agent db-1 --action shell --subject alice --duration 30m "
        "--valid-for 7d",
        "jitctl breakglass issue --agent db-1 --action shell --subject alice --duration 1h "
        "--valid-for 30d --count 3 -o json",
    ],
)
@click.option("--agent", required=True, metavar="NAME", help="The host the codes work on.")
@click.option("--action", required=True, metavar="ACTION", help="The access they give.")
@click.option("--subject", required=True, metavar="USER", help="Who may use them.")
@click.option(
    "--duration",
    type=DURATION,
    required=True,
    help="Access from the moment of use (the agent caps it: breakglass_max, 1h by default).",
)
@click.option(
    "--valid-for",
    type=DURATION,
    required=True,
    metavar="DURATION",
    help="How long the codes stay usable (every code expires; at most 90d).",
)
@click.option("--count", type=click.IntRange(1, 20), default=1, help="How many codes (1-20).")
@click.option("--reason", default="", help="Why, for the audit log.")
async def _issue(
    client: Client,
    out: Output,
    *,
    agent: str,
    action: str,
    subject: str,
    duration: timedelta,
    valid_for: timedelta,
    count: int,
    reason: str,
) -> None:
    issued = await client.issue_breakglass_codes(
        agent, action, subject, duration, valid_for=valid_for, count=count, reason=reason
    )
    now = out.now
    lines = [
        f"{code.id}  {subject} {action} on {agent} for {format_duration(duration)}, "
        f"usable until {output.rfc3339(code.expires_at)}\n  {text}"
        for code, text in issued
    ]
    out.emit(
        [{**output.breakglass_json(code, now), "code": text} for code, text in issued],
        "\n".join(lines)
        + "\n(each code works once: on the host run `jitmesh-agent breakglass --state DIR CODE`)",
    )


@command(
    breakglass,
    "list",
    help="List codes: unused ones, or used ones still to review.",
    examples=["jitctl breakglass list", "jitctl breakglass list --unreviewed -o json"],
)
@click.option("--unreviewed", is_flag=True, help="Only used codes nobody has reviewed yet.")
@click.option("--agent", default="", metavar="NAME", help="Only codes for this agent.")
@click.option("--subject", default="", metavar="USER", help="Only codes for this user.")
@click.option("--all", "all_", is_flag=True, help="Include unused codes that expired.")
async def _list(
    client: Client, out: Output, *, unreviewed: bool, agent: str, subject: str, all_: bool
) -> None:
    found = await client.list_breakglass_codes(
        unreviewed=unreviewed, agent=agent, subject=subject, include_expired=all_
    )
    now = out.now
    out.emit([output.breakglass_json(x, now) for x in found], output.breakglass_table(found, now))


@command(
    breakglass,
    "review",
    help="Mark a used code as reviewed.",
    examples=["jitctl breakglass review ID --note 'INC-42: database outage, checked'"],
)
@click.argument("id", metavar="ID")
@click.option("--note", default="", help="What the review found, for the audit log.")
async def _review(client: Client, out: Output, *, id: str, note: str) -> None:
    code = await client.review_breakglass_use(id, note=note)
    out.emit(
        output.breakglass_json(code, out.now),
        f"reviewed {code.id} ({code.subject} {code.action} on {code.agent}, grant {code.grant_id})",
    )
