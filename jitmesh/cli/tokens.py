"""jitctl token ..., cert ... and user ...: operators' credentials (admins)."""

from __future__ import annotations

from datetime import timedelta

import click

from jitmesh.cli import output
from jitmesh.cli.core import DURATION, Output, command, group
from jitmesh.client import Client

tokens = group(
    None,
    "token",
    help="Operator bearer tokens (admins).",
    examples=[
        "jitctl token create --user erin --group sre --ttl 30d",
        "jitctl token list --user erin",
        "jitctl token revoke tok-...",
    ],
)


@command(
    tokens,
    "create",
    help="Create a token for a user; it is shown once.",
    examples=[
        "jitctl token create --user erin --group sre --ttl 30d --note laptop",
        "jitctl token create --user ci-bot -o json",
        "jitctl token create --user slack-bridge --group bridges --scope review-on-behalf",
    ],
)
@click.option("--user", required=True, metavar="USER", help="Whose token it is.")
@click.option(
    "--group", "groups", multiple=True, metavar="GROUP", help="A group of the user (repeat)."
)
@click.option("--ttl", type=DURATION, metavar="DURATION", help="Default 30d, at most 365d.")
@click.option("--note", default="", help="A note to tell tokens apart (such as 'laptop').")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice(["review-on-behalf"]),
    help="Restrict the token (repeat). review-on-behalf: a notification bridge's credential; "
    "it may only review in the name of a user it signed in (that user's groups decide).",
)
async def _create(
    client: Client,
    out: Output,
    *,
    user: str,
    groups: tuple[str, ...],
    ttl: timedelta | None,
    note: str,
    scopes: tuple[str, ...],
) -> None:
    token, info = await client.create_token(
        user, groups=list(groups), ttl=ttl, label=note, scopes=scopes
    )
    out.emit(
        {**output.token_json(info), "token": token},
        output.token_created_details(token, info, out.now),
    )


@command(
    tokens,
    "list",
    help="List tokens (never the tokens themselves).",
    examples=["jitctl token list", "jitctl token list --user erin -o json"],
)
@click.option("--user", default="", metavar="USER", help="Only this user's tokens.")
async def _list(client: Client, out: Output, *, user: str) -> None:
    found = await client.list_tokens(user)
    out.emit([output.token_json(t) for t in found], output.tokens_table(found, out.now))


@command(
    tokens,
    "revoke",
    help="Revoke a token by its id.",
    examples=["jitctl token revoke tok-..."],
)
@click.argument("id", metavar="ID")
async def _revoke(client: Client, out: Output, *, id: str) -> None:
    await client.revoke_token(id)
    out.emit({"id": id, "state": "revoked"}, f"revoked token {id}")


certs = group(
    None,
    "cert",
    help="Operator client certificates (admins).",
    examples=["jitctl cert revoke 3f2a... --reason 'laptop lost'"],
)


@command(
    certs,
    "revoke",
    help="Refuse a certificate by its SERIAL (hexadecimal, as openssl x509 -serial shows).",
    examples=["jitctl cert revoke 3f2a9c... --reason 'laptop lost'"],
)
@click.argument("serial", metavar="SERIAL")
@click.option("--reason", default="", help="Why, for the audit log.")
async def _cert_revoke(client: Client, out: Output, *, serial: str, reason: str) -> None:
    await client.revoke_certificate(serial, reason=reason)
    out.emit({"id": serial, "state": "revoked"}, f"revoked certificate {serial}")


users = group(
    None,
    "user",
    help="Disable or enable operators, or change their groups (admins).",
    examples=[
        "jitctl user disable mallory",
        "jitctl user enable mallory",
        "jitctl user set-groups alice --group developers --group sre",
    ],
)


@command(
    users,
    "disable",
    help="Refuse every call of a user from now on.",
    examples=["jitctl user disable mallory"],
)
@click.argument("user", metavar="USER")
async def _disable(client: Client, out: Output, *, user: str) -> None:
    await client.set_user_disabled(user, True)
    out.emit({"id": user, "state": "disabled"}, f"disabled {user}")


@command(
    users,
    "enable",
    help="Let a disabled user back in.",
    examples=["jitctl user enable mallory"],
)
@click.argument("user", metavar="USER")
async def _enable(client: Client, out: Output, *, user: str) -> None:
    await client.set_user_disabled(user, False)
    out.emit({"id": user, "state": "enabled"}, f"enabled {user}")


@command(
    users,
    "set-groups",
    help="Replace a user's groups (the one way they change: a new token never changes them). "
    "Audited with the groups before and after.",
    examples=["jitctl user set-groups alice --group developers --group sre --reason 'on call'"],
)
@click.argument("user", metavar="USER")
@click.option(
    "--group", "groups", multiple=True, required=True, metavar="GROUP", help="A group (repeat)."
)
@click.option("--reason", default="", help="Why, for the audit log.")
async def _set_groups(
    client: Client, out: Output, *, user: str, groups: tuple[str, ...], reason: str
) -> None:
    info = await client.set_user_groups(user, groups, reason=reason)
    out.emit(output.user_json(info), f"{info.name}: groups {', '.join(info.groups)}")
