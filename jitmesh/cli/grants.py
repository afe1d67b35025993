"""jitctl grant ...: see and end grants."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import click

from jitmesh.cli import output
from jitmesh.cli.core import (
    DURATION,
    POSITIVE,
    CommandFailed,
    Output,
    StateType,
    command,
    group,
)
from jitmesh.client import Client
from jitmesh.types import Grant, GrantState

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


WAIT_OPTIONS = (
    click.option(
        "--wait",
        is_flag=True,
        help="Wait until the agent has removed the access (exit 1 if it could not).",
    ),
    click.option(
        "--wait-timeout",
        type=DURATION,
        default="5m",
        metavar="DURATION",
        show_default=True,
        help="Give up waiting after this long (the agent may be offline).",
    ),
)


def _wait_options(f: Any) -> Any:
    for option in reversed(WAIT_OPTIONS):
        f = option(f)
    return f


# Where a grant ends once the agent has answered (REVOKE_FAILED: it answered "could not").
_REMOVED = frozenset({GrantState.REVOKED, GrantState.RELEASED, GrantState.EXPIRED})
_ANSWERED = _REMOVED | {GrantState.REVOKE_FAILED, GrantState.FAILED}


async def _until_removed(
    client: Client, out: Output, grant: Grant, wait_timeout: timedelta
) -> Grant:
    """Wait until the agent acknowledged the removal; the grant as it then is."""
    if grant.state not in _ANSWERED:
        with out.waiting(f"waiting for agent {grant.agent} to remove grant {grant.id}"):
            await client.wait_for_request(
                grant.request_id,
                until=lambda r: r.grant_state in _ANSWERED,
                timeout=wait_timeout,
            )
        grant = await client.get_grant(grant.id)
    return grant


def _removal_failure(grant: Grant) -> str | None:
    if grant.state in _REMOVED:
        return None
    why = f": {grant.failure}" if grant.failure else ""
    return f"grant {grant.id} could not be removed on agent {grant.agent}{why}"


@command(
    grants,
    "revoke",
    help="Take a grant away before it expires.",
    examples=[
        "jitctl grant revoke grt-... --reason 'incident INC-7'",
        "jitctl grant revoke grt-... --reason done --wait   # until the host removed it",
    ],
)
@click.argument("id", metavar="ID")
@click.option("--reason", default="", help="Why, for the audit log and the grantee.")
@_wait_options
async def _revoke(
    client: Client, out: Output, *, id: str, reason: str, wait: bool, wait_timeout: timedelta
) -> None:
    grant = await client.revoke_grant(id, reason=reason)
    if wait:
        grant = await _until_removed(client, out, grant, wait_timeout)
    out.emit(output.grant_json(grant), output.grant_details(grant, out.now))
    failure = _removal_failure(grant) if wait else None
    if failure is not None:
        raise CommandFailed(failure)


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
    examples=["jitctl grant release grt-...", "jitctl grant release grt-... --wait"],
)
@click.argument("id", metavar="ID")
@_wait_options
async def _release(
    client: Client, out: Output, *, id: str, wait: bool, wait_timeout: timedelta
) -> None:
    grant = await client.release_grant(id)
    if wait:
        grant = await _until_removed(client, out, grant, wait_timeout)
    out.emit(output.grant_json(grant), output.grant_details(grant, out.now))
    failure = _removal_failure(grant) if wait else None
    if failure is not None:
        raise CommandFailed(failure)
