"""jitctl request ...: ask for access, and review requests."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from typing import Final

import click

from jitmesh import errors
from jitmesh.cli import output
from jitmesh.cli.core import (
    DURATION,
    NON_NEGATIVE,
    POSITIVE,
    CommandFailed,
    Output,
    StateType,
    command,
    group,
)
from jitmesh.client import Client
from jitmesh.types import Grant, GrantState, Request, RequestState


class StartType(click.ParamType[datetime]):
    """An instant in RFC 3339 (a trailing Z for UTC; a time without a zone is refused)."""

    name = "time"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value).strip()
        try:
            at = datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError:
            self.fail("expected RFC 3339 such as 2026-12-24T09:00Z", param, ctx)
        if at.tzinfo is None:
            self.fail("give the zone (2026-12-24T09:00Z or +01:00)", param, ctx)
        return at.astimezone(UTC)


START: Final = StartType()


requests = group(
    None,
    "request",
    help="Ask for access, and review requests.",
    examples=[
        "jitctl request create --agent web-1 --action deploy --duration 15m --reason INC-42 --wait",
        "jitctl request list --state pending",
        "jitctl request approve req-... --reason 'looks fine'",
    ],
)


@command(
    requests,
    "create",
    help="Ask for an action on an agent for a while.",
    examples=[
        "jitctl request create --agent web-1 --action deploy --duration 15m --reason INC-42",
        "jitctl request create --agent db-1 --action logs --duration 1h30m --wait",
        "jitctl request create --agent web-1 --action deploy --duration 15m -o json",
        "jitctl request create --agent db-1 --action deploy --duration 30m --reason hotfix "
        "--ticket INC-42",
        "jitctl request create --agent db-1 --action deploy --start 2026-12-24T09:00Z "
        "--duration 2h --reason release",
        "jitctl request create --selector env=staging --action deploy --duration 30m",
    ],
)
@click.option("--agent", default="", metavar="NAME", help="The host's agent.")
@click.option(
    "--selector",
    "selector",
    multiple=True,
    metavar="KEY=VALUE",
    help="Instead of --agent: every agent with these labels (repeat for several), one "
    "request, one approval, a grant per host.",
)
@click.option(
    "--action",
    required=True,
    metavar="ACTION",
    help="What to be allowed to do (policy names them).",
)
@click.option("--duration", required=True, type=DURATION, help="How long, such as 15m or 1h30m.")
@click.option("--reason", default="", help="Why (some rules require one).")
@click.option("--ticket", default="", metavar="ID", help="A ticket id (some rules require one).")
@click.option(
    "--start",
    type=START,
    default=None,
    metavar="TIME",
    help="Start later (RFC 3339, such as 2026-12-24T09:00Z): approved before, issued then; "
    "the duration counts from the start.",
)
@click.option(
    "--wait",
    is_flag=True,
    help="Wait for approval and for the agent to apply the grant (exit 1 if it does not).",
)
@click.option(
    "--wait-timeout",
    type=DURATION,
    default="10m",
    metavar="DURATION",
    show_default=True,
    help="Give up waiting after this long.",
)
async def _create(
    client: Client,
    out: Output,
    *,
    agent: str,
    selector: tuple[str, ...],
    action: str,
    duration: timedelta,
    reason: str,
    ticket: str,
    start: datetime | None,
    wait: bool,
    wait_timeout: timedelta,
) -> None:
    labels = {}
    for item in selector:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter("expected KEY=VALUE", param_hint="--selector")
        labels[key] = value
    if bool(agent) == bool(labels):
        raise click.UsageError("name the host with --agent NAME or the hosts with --selector")
    request, grant = await client.create_request(
        agent=agent,
        action=action,
        duration=duration,
        reason=reason,
        ticket=ticket,
        start_at=start,
        selector=labels,
    )
    if not wait:
        out.emit(
            output.request_json(request, grant), output.request_details(request, out.now, grant)
        )
        return
    if not out.structured:
        # Show the id at once: it is what approvers are told while we wait.
        out.show(output.request_details(request, out.now, grant))
    with out.waiting(f"waiting for request {request.id} to be decided") as say:

        def done(snapshot: Request) -> bool:
            # The spinner says which part is left: the decision, or the host applying it.
            if snapshot.state is RequestState.SCHEDULED:
                say(f"request {snapshot.id} approved; waiting for its start")
            elif snapshot.state is RequestState.APPROVED and snapshot.grant_id:
                say(f"request approved; waiting for agent {snapshot.agent} to apply grant "
                    f"{snapshot.grant_id}")  # fmt: skip
            return settled(snapshot)

        final = await client.wait_for_request(request.id, until=done, timeout=wait_timeout)
    grant = await client.get_grant(final.grant_id) if final.grant_id else None
    failure = wait_failure(final, grant)
    if out.structured:
        out.emit(output.request_json(final, grant), "")
    elif grant is not None and failure is None:
        out.line(
            f"grant {grant.id} is active on {grant.agent} until "
            f"{output.human_time(grant.expires_at)} ({output.relative(grant.expires_at, out.now)})"
        )
    if failure is not None:
        raise CommandFailed(failure)


def settled(request: Request) -> bool:
    """Nothing more to wait for: decided, and if approved, the agent has answered."""
    if request.state in (RequestState.PENDING, RequestState.SCHEDULED):
        return False
    if request.state is not RequestState.APPROVED:
        return True
    return request.grant_state not in (None, GrantState.PENDING_DELIVERY)


def wait_failure(request: Request, grant: Grant | None) -> str | None:
    """Why a settled request did not end in an active grant, or None when it did."""
    who = f" by {request.decided_by}" if request.decided_by else ""
    why = f": {request.decision_reason}" if request.decision_reason else ""
    match request.state:
        case RequestState.DENIED:
            return f"request {request.id} was denied{who}{why}"
        case RequestState.CANCELLED:
            return f"request {request.id} was cancelled{who}{why}"
        case RequestState.EXPIRED:
            return f"request {request.id} expired before it was approved"
        case RequestState.PENDING:
            return f"request {request.id} is still pending"
    state = grant.state if grant is not None else request.grant_state
    if state is GrantState.ACTIVE:
        return None
    name = state.value.lower() if state is not None else "unknown"
    if state is GrantState.FAILED:
        failure = grant.failure if grant is not None and grant.failure else "no reason given"
        return f"grant {request.grant_id} failed on agent {request.agent}: {failure}"
    return f"grant {request.grant_id} is {name} on agent {request.agent}"


@command(
    requests,
    "list",
    help="List requests, newest last.",
    examples=[
        "jitctl request list",
        "jitctl request list --state pending --agent web-1",
        "jitctl request list --subject alice --limit 20 -o yaml",
        "jitctl request list --reviewable",
    ],
)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=StateType(RequestState),
    help="Only requests in this state (repeat for several).",
)
@click.option("--agent", default="", metavar="NAME", help="Only requests for this agent.")
@click.option("--subject", default="", metavar="USER", help="Only requests by this user.")
@click.option("--limit", type=POSITIVE, metavar="N", help="At most N requests.")
@click.option(
    "--reviewable",
    is_flag=True,
    help="Only the pending requests you may approve now (your stage, not your own).",
)
async def _list(
    client: Client,
    out: Output,
    *,
    states: tuple[RequestState, ...],
    agent: str,
    subject: str,
    limit: int | None,
    reviewable: bool,
) -> None:
    found = await client.list_requests(
        states=states, subject=subject, agent=agent, limit=limit, reviewable=reviewable
    )
    out.emit([output.request_json(r) for r in found], output.requests_table(found, out.now))


@command(
    requests,
    "show",
    help="Show one request.",
    examples=["jitctl request show req-...", "jitctl request show req-... -o json"],
)
@click.argument("id", metavar="ID")
async def _show(client: Client, out: Output, *, id: str) -> None:
    request = await client.get_request(id)
    table = output.request_details(request, out.now)
    value = output.request_json(request)
    # The request's page on jitmesh-web, as the coordinator gives it (its --web-url), else
    # from JITMESH_WEB_URL (a coordinator older than 0.2 gives none).
    link = request.link
    web = os.environ.get("JITMESH_WEB_URL", "").rstrip("/")
    if not link and web:
        link = f"{web}/requests/{request.id}"
    if link:
        table = output.Table(table.headers, (*table.rows, ("LINK", link)))
        if isinstance(value, dict):
            value["link"] = link
    out.emit(value, table)


ON_BEHALF_HELP = (
    "Review in the name of this user (needs a token with scope review-on-behalf; the user's "
    "own groups decide)."
)


@command(
    requests,
    "approve",
    help="Approve a pending request (approvers).",
    examples=["jitctl request approve req-...", "jitctl request approve req-... --reason 'ok'"],
)
@click.argument("id", metavar="ID")
@click.option("--reason", default="", help="Why, for the audit log.")
@click.option("--on-behalf-of", default="", metavar="USER", help=ON_BEHALF_HELP)
async def _approve(client: Client, out: Output, *, id: str, reason: str, on_behalf_of: str) -> None:
    request, grant = await client.approve(id, reason=reason, on_behalf_of=on_behalf_of)
    out.emit(output.request_json(request, grant), output.request_details(request, out.now, grant))


@command(
    requests,
    "deny",
    help="Deny a pending request (approvers).",
    examples=["jitctl request deny req-... --reason 'change freeze'"],
)
@click.argument("id", metavar="ID")
@click.option("--reason", default="", help="Why, shown to the requester.")
@click.option("--on-behalf-of", default="", metavar="USER", help=ON_BEHALF_HELP)
async def _deny(client: Client, out: Output, *, id: str, reason: str, on_behalf_of: str) -> None:
    request = await client.deny(id, reason=reason, on_behalf_of=on_behalf_of)
    out.emit(output.request_json(request), output.request_details(request, out.now))


@command(
    requests,
    "cancel",
    help="Withdraw your own pending request.",
    examples=["jitctl request cancel req-..."],
)
@click.argument("id", metavar="ID")
async def _cancel(client: Client, out: Output, *, id: str) -> None:
    request = await client.cancel(id)
    out.emit(output.request_json(request), output.request_details(request, out.now))


# Back-off between re-subscriptions of `request watch` after the stream ended.
WATCH_RETRY_MIN: Final = 0.1
WATCH_RETRY_MAX: Final = 5.0


@command(
    requests,
    "watch",
    help="Print requests as they are created and decided (Ctrl-C stops); with -o json one "
    "object per line, each with its change_seq, resumable with --after.",
    examples=[
        "jitctl request watch",
        "jitctl request watch -o json --after 1200 >> requests.jsonl",
        "jitctl request watch --id req-...",
    ],
)
@click.option(
    "--after",
    type=NON_NEGATIVE,
    default=0,
    metavar="SEQ",
    help="First every request changed after this change_seq (the last one you have).",
)
@click.option("--id", "ids", multiple=True, metavar="ID", help="Only this request (repeatable).")
async def _watch(client: Client, out: Output, *, after: int, ids: tuple[str, ...]) -> None:
    """When the coordinator ends the stream (a restart, a recycled connection), subscribe
    again after the last change shown: nothing is skipped. Only a coordinator that cannot be
    reached at all is an error."""
    subscribed = False
    retry = WATCH_RETRY_MIN
    while True:
        try:
            async for request in client.watch_requests(ids, after_change_seq=after):
                subscribed = True
                retry = WATCH_RETRY_MIN
                if request.change_seq and request.change_seq <= after:
                    continue  # seen already (a change between subscribing and resuming)
                after = max(after, request.change_seq)
                out.record(output.request_json(request), output.request_stream_row(request))
            subscribed = True
        except errors.UnavailableError:
            if not subscribed:
                raise
        await asyncio.sleep(retry)
        retry = min(retry * 2, WATCH_RETRY_MAX)


@command(
    requests,
    "options",
    help="What you may ask for: agents, actions, longest durations and the approval each "
    "would get now.",
    examples=[
        "jitctl request options",
        "jitctl request options --agent db-1",
        "jitctl request options --action deploy -o json",
    ],
)
@click.option("--agent", default="", metavar="NAME", help="Only this agent.")
@click.option("--action", default="", metavar="ACTION", help="Only this action.")
async def _options(client: Client, out: Output, *, agent: str, action: str) -> None:
    found = await client.request_options(agent=agent, action=action)
    out.emit([output.option_json(o) for o in found], output.options_table(found))
