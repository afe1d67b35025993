"""jitctl lock ...: the emergency stop (admins)."""

from __future__ import annotations

from datetime import timedelta

import click

from jitmesh.cli import output
from jitmesh.cli.core import DURATION, Output, command, group
from jitmesh.client import Client

locks = group(
    None,
    "lock",
    help="Emergency stop: end and refuse access (admins).",
    examples=[
        "jitctl lock create --subject alice --reason 'INC-99: laptop stolen'",
        "jitctl lock list",
        "jitctl lock lift lck-... --reason 'laptop found'",
    ],
)


@command(
    locks,
    "create",
    help="Revoke matching grants now and refuse new ones until lifted.",
    examples=[
        "jitctl lock create --subject alice --reason 'INC-99: laptop stolen'",
        "jitctl lock create --agent db-1 --action shell --reason 'INC-100' --ttl 4h",
    ],
)
@click.option("--subject", default="", metavar="USER", help="Lock this user.")
@click.option("--agent", default="", metavar="NAME", help="Lock this agent.")
@click.option("--action", default="", metavar="ACTION", help="Lock this action.")
@click.option("--reason", required=True, help="Why (required, for the audit log).")
@click.option("--ttl", type=DURATION, metavar="DURATION", help="Lift by itself after this long.")
async def _create(
    client: Client,
    out: Output,
    *,
    subject: str,
    agent: str,
    action: str,
    reason: str,
    ttl: timedelta | None,
) -> None:
    lock, revoked, denied = await client.create_lock(
        subject=subject, agent=agent, action=action, reason=reason, ttl=ttl
    )
    out.emit(
        {**output.lock_json(lock, out.now), "grants_revoked": revoked, "requests_denied": denied},
        f"locked {output.cell(lock.target.describe())} ({lock.id}); "
        f"grants revoked: {revoked}, pending requests denied: {denied}",
    )


@command(
    locks,
    "list",
    help="List locks in force.",
    examples=["jitctl lock list", "jitctl lock list --all -o json"],
)
@click.option("--all", "all_", is_flag=True, help="Include lifted and expired locks.")
async def _list(client: Client, out: Output, *, all_: bool) -> None:
    found = await client.list_locks(include_ended=all_)
    now = out.now
    out.emit([output.lock_json(x, now) for x in found], output.locks_table(found, now))


@command(
    locks,
    "lift",
    help="End a lock.",
    examples=["jitctl lock lift lck-... --reason 'laptop found'"],
)
@click.argument("id", metavar="ID")
@click.option("--reason", default="", help="Why, for the audit log.")
async def _lift(client: Client, out: Output, *, id: str, reason: str) -> None:
    lock = await client.lift_lock(id, reason=reason)
    out.emit(output.lock_json(lock, out.now), f"lifted {lock.id}")
