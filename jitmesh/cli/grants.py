"""jitctl grant ...: see and end grants."""

from __future__ import annotations

from datetime import timedelta

import click

from jitmesh.cli import output
from jitmesh.cli.core import DURATION, POSITIVE, Output, StateType, command, group
from jitmesh.client import Client
from jitmesh.types import GrantState

# What `grant list` shows without --all or --state: grants that still hold, or may hold, access.
LIVE_GRANT_STATES = tuple(s for s in GrantState if not s.terminal)

grants = group(
    None,
    "grant",
    help="See and end grants.",
    examples=[
        "jitctl grant list",
        "jitctl grant list --all --subject alice",
        "jitctl grant revoke grant-... --reason 'deploy finished'",
    ],
)


@command(
    grants,
    "list",
    help="List grants (by default only those that hold, or may hold, access).",
    examples=[
        "jitctl grant list",
        "jitctl grant list --state revoke_failed",
        "jitctl grant list --all --agent web-1 -o json",
    ],
)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=StateType(GrantState),
    help="Only grants in this state (repeat for several).",
)
@click.option("--all", "all_", is_flag=True, help="Include ended grants.")
@click.option("--agent", default="", metavar="NAME", help="Only grants on this agent.")
@click.option("--subject", default="", metavar="USER", help="Only grants of this user.")
@click.option("--limit", type=POSITIVE, metavar="N", help="At most N grants.")
async def _list(
    client: Client,
    out: Output,
    *,
    states: tuple[GrantState, ...],
    all_: bool,
    agent: str,
    subject: str,
    limit: int | None,
) -> None:
    if states and all_:
        raise click.UsageError(
            "argument --all: not allowed with argument --state", click.get_current_context()
        )
    wanted = states or (() if all_ else LIVE_GRANT_STATES)
    found = await client.list_grants(states=wanted, subject=subject, agent=agent, limit=limit)
    out.emit([output.grant_json(g) for g in found], output.grants_table(found, out.now))


@command(
    grants,
    "show",
    help="Show one grant.",
    examples=["jitctl grant show grant-...", "jitctl grant show grant-... -o yaml"],
)
@click.argument("id", metavar="ID")
async def _show(client: Client, out: Output, *, id: str) -> None:
    grant = await client.get_grant(id)
    out.emit(output.grant_json(grant), output.grant_details(grant, out.now))


@command(
    grants,
    "revoke",
    help="Take a grant away before it expires.",
    examples=["jitctl grant revoke grant-... --reason 'incident INC-7'"],
)
@click.argument("id", metavar="ID")
@click.option("--reason", default="", help="Why, for the audit log and the grantee.")
async def _revoke(client: Client, out: Output, *, id: str, reason: str) -> None:
    grant = await client.revoke_grant(id, reason=reason)
    out.emit(output.grant_json(grant), output.grant_details(grant, out.now))


@command(
    grants,
    "extend",
    help="Make your live grant end later, in place (no gap on the host).",
    examples=[
        "jitctl grant extend grt-... --by 30m",
        "jitctl grant extend grt-... --by 1h --reason 'migration still running'",
    ],
)
@click.argument("id", metavar="ID")
@click.option("--by", required=True, type=DURATION, help="How much later, such as 30m.")
@click.option("--reason", default="", help="Why (for the audit log and approvers).")
@click.option("--ticket", default="", metavar="ID", help="A ticket id (some rules require one).")
async def _extend(
    client: Client, out: Output, *, id: str, by: timedelta, reason: str, ticket: str
) -> None:
    grant, pending = await client.extend_grant(id, by=by, reason=reason, ticket=ticket)
    if pending is not None:
        out.emit(output.request_json(pending), output.request_details(pending, out.now))
        return
    out.emit(output.grant_json(grant), output.grant_details(grant, out.now))


@command(
    grants,
    "release",
    help="Hand your own grant back early.",
    examples=["jitctl grant release grant-..."],
)
@click.argument("id", metavar="ID")
async def _release(client: Client, out: Output, *, id: str) -> None:
    grant = await client.release_grant(id)
    out.emit(output.grant_json(grant), output.grant_details(grant, out.now))
