"""jitctl notify ...: notification receivers and the delivery log (admins)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from jitmesh.cli import output
from jitmesh.cli.core import POSITIVE, LabelType, Output, UsageError, command, group
from jitmesh.client import Client
from jitmesh.types import NotifyDelivery, NotifyReceiver, NotifyRoute

notify = group(
    None,
    "notify",
    help="Where notifications go, and what was delivered (admins).",
    examples=[
        "jitctl notify receiver add ops-hook --kind webhook --target https://hooks.example/jit "
        "--secret-file /etc/jitmesh/hook.secret",
        "jitctl notify receiver list",
        "jitctl notify log --receiver ops-hook",
    ],
)
receiver = group(
    notify,
    "receiver",
    help="Add, list and remove receivers (webhook, slack, email).",
    examples=["jitctl notify receiver list"],
)


def receiver_json(r: NotifyReceiver) -> output.JSON:
    return {
        "name": r.name,
        "kind": r.kind,
        "target": r.target,
        "events": list(r.route.events),
        "agent_labels": dict(r.route.agent_labels),
        "actions": list(r.route.actions),
        "rules": list(r.route.rules),
        "requesters": r.route.requesters,
        "settings": dict(r.settings),
        "secret": r.secret_source or "none",
        "created_by": r.created_by,
    }


def delivery_json(d: NotifyDelivery) -> output.JSON:
    return {
        "id": d.id,
        "receiver": d.receiver,
        "event": d.event_kind,
        "state": d.state,
        "attempts": d.attempts,
        "last_attempt_at": output.rfc3339(d.last_attempt_at),
        "next_attempt_at": output.rfc3339(d.next_attempt_at),
        "last_error": d.last_error,
        "request": d.request_id,
        "grant": d.grant_id,
    }


@command(
    receiver,
    "add",
    help="Add a receiver; its secret is sealed by the coordinator and never shown again.",
    examples=[
        "jitctl notify receiver add ops-hook --kind webhook --target https://hooks.example/jit "
        "--secret-file /etc/jitmesh/hook.secret --event request.created --label env=prod",
        "jitctl notify receiver add approvers --kind slack --target C0APPROVERS "
        "--secret-file /etc/jitmesh/slack-bot-token --setting users=U0BOB=bob,U0CAROL=carol",
        "jitctl notify receiver add mail --kind email --target sre@example.com "
        "--setting host=smtp.example.com --setting sender=jit@example.com --requesters "
        "--setting requester_domain=example.com",
    ],
)
@click.argument("name", metavar="NAME")
@click.option(
    "--kind",
    required=True,
    type=click.Choice(["webhook", "slack", "email"]),
    metavar="KIND",
    help="webhook, slack or email.",
)
@click.option(
    "--target", default="", help="Webhook URL, Slack channel id, or e-mail addresses (a,b)."
)
@click.option(
    "--secret-file",
    default="",
    metavar="PATH",
    help="Read the secret from this file now (sealed in the store).",
)
@click.option(
    "--secret-ref",
    default="",
    metavar="PATH",
    help="A file on the coordinator's host, read at each send (the secret is not stored).",
)
@click.option("--event", "events", multiple=True, metavar="KIND", help="Only these events.")
@click.option("--label", "labels", multiple=True, type=LabelType(), help="Only agents with it.")
@click.option("--action", "actions", multiple=True, metavar="ACTION", help="Only these actions.")
@click.option("--rule", "rules", multiple=True, metavar="RULE", help="Only these policy rules.")
@click.option("--requesters", is_flag=True, help="Also send requesters their own outcomes.")
@click.option("--setting", "settings", multiple=True, type=LabelType(), help="KEY=VALUE.")
async def _add(
    client: Client,
    out: Output,
    *,
    name: str,
    kind: str,
    target: str,
    secret_file: str,
    secret_ref: str,
    events: tuple[str, ...],
    labels: tuple[tuple[str, str], ...],
    actions: tuple[str, ...],
    rules: tuple[str, ...],
    requesters: bool,
    settings: tuple[tuple[str, str], ...],
) -> None:
    if secret_file and secret_ref:
        raise UsageError("give --secret-file or --secret-ref, not both")
    secret = ""
    if secret_file:
        try:
            secret = (await asyncio.to_thread(Path(secret_file).read_text)).strip()
        except OSError as exc:
            raise UsageError(f"cannot read the secret file: {exc.strerror}") from None
    added = await client.add_receiver(
        name,
        kind,
        target=target,
        route=NotifyRoute(
            events=events,
            agent_labels=dict(labels),
            actions=actions,
            rules=rules,
            requesters=requesters,
        ),
        settings=dict(settings),
        secret=secret,
        secret_file=secret_ref,
    )
    out.emit(receiver_json(added), f"added receiver {added.name} ({added.kind})")


@command(
    receiver,
    "list",
    help="List receivers and their routes (never their secrets).",
    examples=["jitctl notify receiver list", "jitctl notify receiver list -o json"],
)
async def _list(client: Client, out: Output) -> None:
    found = await client.list_receivers()
    rows = [
        (
            r.name,
            r.kind,
            r.target,
            ",".join(r.route.events) or "all",
            ",".join(f"{k}={v}" for k, v in sorted(r.route.agent_labels.items())) or "any",
            "yes" if r.route.requesters else "",
            r.secret_source or "none",
        )
        for r in found
    ]
    out.emit(
        [receiver_json(r) for r in found],
        output.table(["NAME", "KIND", "TARGET", "EVENTS", "AGENTS", "REQUESTERS", "SECRET"], rows),
    )


@command(
    receiver,
    "remove",
    help="Remove a receiver; its undelivered notices are given up (the log keeps them).",
    examples=["jitctl notify receiver remove ops-hook"],
)
@click.argument("name", metavar="NAME")
async def _remove(client: Client, out: Output, *, name: str) -> None:
    await client.remove_receiver(name)
    out.emit({"removed": name}, f"removed receiver {name}")


@command(
    notify,
    "log",
    help="Deliveries, newest first: state, attempts and the last error.",
    examples=["jitctl notify log", "jitctl notify log --receiver ops-hook --limit 20 -o json"],
)
@click.option("--receiver", default="", metavar="NAME", help="Only this receiver.")
@click.option("--limit", default=50, type=POSITIVE, metavar="N", help="At most N deliveries.")
async def _log(client: Client, out: Output, *, receiver: str, limit: int) -> None:
    found = await client.list_deliveries(receiver=receiver, limit=limit)
    now = out.now
    rows = [
        (
            d.receiver,
            d.event_kind,
            d.state,
            d.attempts,
            output.relative(d.last_attempt_at, now) if d.last_attempt_at else "",
            output.relative(d.next_attempt_at, now) if d.next_attempt_at else "",
            d.request_id or d.grant_id,
            d.last_error,
        )
        for d in found
    ]
    out.emit(
        [delivery_json(d) for d in found],
        output.table(
            ["RECEIVER", "EVENT", "STATE", "ATTEMPTS", "LAST", "NEXT", "REQUEST", "ERROR"], rows
        ),
    )
