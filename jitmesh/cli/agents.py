"""jitctl agent ...: see, enroll and remove agents."""

from __future__ import annotations

from datetime import timedelta

import click

from jitmesh.cli import output
from jitmesh.cli.core import DURATION, LABEL, Output, command, group
from jitmesh.client import Client

agents = group(
    None,
    "agent",
    help="See, enroll and remove agents.",
    examples=[
        "jitctl agent list",
        "jitctl agent token create --label env=prod --label role=web --ttl 1h",
        "jitctl agent remove web-9",
    ],
)


@command(
    agents,
    "list",
    help="List agents and whether they are connected.",
    examples=["jitctl agent list", "jitctl agent list -o json"],
)
async def _list(client: Client, out: Output) -> None:
    found = await client.list_agents()
    out.emit([output.agent_json(a) for a in found], output.agents_table(found, out.now))


@command(
    agents,
    "show",
    help="Show one agent.",
    examples=["jitctl agent show web-1"],
)
@click.argument("name", metavar="NAME")
async def _show(client: Client, out: Output, *, name: str) -> None:
    agent = await client.get_agent(name)
    out.emit(output.agent_json(agent), output.agent_details(agent, out.now))


@command(
    agents,
    "remove",
    help="Forget an agent and revoke its grants (admins).",
    examples=["jitctl agent remove web-9"],
)
@click.argument("name", metavar="NAME")
async def _remove(client: Client, out: Output, *, name: str) -> None:
    await client.remove_agent(name)
    out.emit(output.removed_json(name), output.removed_table(name))


tokens = group(
    agents,
    "token",
    help="Join tokens for enrolling agents (admins).",
    examples=["jitctl agent token create --label env=prod --ttl 1h"],
)


@command(
    tokens,
    "create",
    help="Create a one-time join token; the agent enrolls with it once.",
    examples=[
        "jitctl agent token create --label env=prod --label role=web",
        "jitctl agent token create --ttl 2h -o json",
        "jitctl agent token create --replace web-1   # a reinstalled host",
    ],
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    type=LABEL,
    metavar="KEY=VALUE",
    help="A label the agent gets (repeat for several).",
)
@click.option("--ttl", type=DURATION, metavar="DURATION", help="How long the token is valid.")
@click.option(
    "--replace",
    default="",
    metavar="NAME",
    help="Enroll this already enrolled agent again (a reinstalled host): its old certificate "
    "stops working; without --label its labels are kept.",
)
async def _token_create(
    client: Client,
    out: Output,
    *,
    labels: tuple[tuple[str, str], ...],
    ttl: timedelta | None,
    replace: str,
) -> None:
    wanted = dict(labels)
    token = await client.create_join_token(labels=wanted, ttl=ttl, replaces=replace)
    out.emit(
        output.join_token_json(token, wanted), output.join_token_details(token, wanted, out.now)
    )


@command(
    tokens,
    "list",
    help="List join tokens that can still enroll an agent (never the tokens themselves).",
    examples=["jitctl agent token list", "jitctl agent token list --all -o json"],
)
@click.option("--all", "include_ended", is_flag=True, help="Also used, expired and revoked ones.")
async def _token_list(client: Client, out: Output, *, include_ended: bool) -> None:
    found = await client.list_join_tokens(include_ended=include_ended)
    out.emit(
        [output.join_token_info_json(t) for t in found], output.join_tokens_table(found, out.now)
    )


@command(
    tokens,
    "revoke",
    help="Revoke a join token (a leaked one): it enrolls nothing from now on. Audited.",
    examples=["jitctl agent token revoke 3f9c0d1e2a4b5c6d --reason 'pasted in a ticket'"],
)
@click.argument("id", metavar="ID")
@click.option("--reason", default="", help="Why, for the audit log.")
async def _token_revoke(client: Client, out: Output, *, id: str, reason: str) -> None:
    info = await client.revoke_join_token(id, reason=reason)
    out.emit(output.join_token_info_json(info), f"revoked join token {info.id}")
