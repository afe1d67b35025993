"""jitctl audit ...: read, follow, export and verify the audit log."""

from __future__ import annotations

import asyncio
import json
from typing import Final

import click

from jitmesh import errors
from jitmesh.cli import output
from jitmesh.cli.core import (
    NON_NEGATIVE,
    POSITIVE,
    SINCE,
    CommandFailed,
    Output,
    Since,
    command,
    group,
    settings,
)
from jitmesh.client import Client

VERIFY_TIMEOUT: Final = 60.0
# Back-off between re-subscriptions of `audit tail` after the coordinator ended the stream.
TAIL_RETRY_MIN: Final = 0.1
TAIL_RETRY_MAX: Final = 5.0

audit = group(
    None,
    "audit",
    help="Read, follow, export and verify the audit log.",
    examples=[
        "jitctl audit list --since 1h --agent web-1",
        "jitctl audit tail -o json --after 1200",
        "jitctl audit verify",
    ],
)


@command(
    audit,
    "list",
    help="List audit events, oldest first.",
    examples=[
        "jitctl audit list --since 1h",
        "jitctl audit list --since 2026-01-01T00:00:00Z --kind grant.revoked -o json",
        "jitctl audit list --grant grant-...",
    ],
)
@click.option("--since", type=SINCE, metavar="TIME", help="RFC 3339, or 1h for an hour ago.")
@click.option("--agent", default="", metavar="NAME", help="Only events about this agent.")
@click.option("--subject", default="", metavar="USER", help="Only events about this user.")
@click.option("--kind", default="", metavar="KIND", help="Only events of this kind.")
@click.option("--grant", default="", metavar="ID", help="Only events of this grant.")
@click.option("--request", default="", metavar="ID", help="Only events of this request.")
@click.option("--limit", type=POSITIVE, metavar="N", help="At most N events.")
async def _list(
    client: Client,
    out: Output,
    *,
    since: Since | None,
    agent: str,
    subject: str,
    kind: str,
    grant: str,
    request: str,
    limit: int | None,
) -> None:
    events = await client.list_audit(
        since=since.resolve(out.now) if since else None,
        agent=agent,
        subject=subject,
        kind=kind,
        grant_id=grant,
        request_id=request,
        limit=limit,
    )
    out.emit([output.event_json(e) for e in events], output.events_table(events))


@command(
    audit,
    "verify",
    help="Check the hash chain; exit 1 and name the first bad entry if it is broken.",
    examples=["jitctl audit verify", "jitctl audit verify -o json --timeout 5m"],
)
async def _verify(client: Client, out: Output) -> None:
    # Walking the whole chain takes longer than a lookup: a longer deadline unless one was given.
    given = settings().timeout
    timeout = given.total_seconds() if given else VERIFY_TIMEOUT
    result = await client.verify_audit(timeout=timeout)
    out.emit(output.verification_json(result), output.verification_details(result))
    if not result.ok:
        problem = f": {result.problem}" if result.problem else ""
        raise CommandFailed(f"audit chain is broken at seq {result.first_bad_seq}{problem}")


@command(
    audit,
    "export",
    help="Write the log, signed checkpoints and public keys as JSON lines (for an outside "
    "verifier: always JSON lines, whatever -o says).",
    examples=[
        "jitctl audit export > audit.jsonl",
        "scripts/verify_audit_export audit.jsonl",
    ],
)
async def _export(client: Client, out: Output) -> None:
    async for record in client.export_audit():
        out.line(json.dumps(record, ensure_ascii=False, sort_keys=True))


@command(
    audit,
    "tail",
    help="Print events as they are written, like tail -F (Ctrl-C stops); with -o json one "
    "object per line, resumable with --after.",
    examples=[
        "jitctl audit tail",
        "jitctl audit tail -o json --after 1200 >> siem.jsonl",
    ],
)
@click.option(
    "--after",
    "--after-seq",
    "after",
    type=NON_NEGATIVE,
    default=0,
    metavar="SEQ",
    help="Start after this sequence number (the last one you have).",
)
async def _tail(client: Client, out: Output, *, after: int) -> None:
    """Follow the log like `tail -F`: when the coordinator ends the stream (a restart, a
    recycled connection), subscribe again after the last event shown, so nothing is printed
    twice or skipped. Only a coordinator that cannot be reached at all is an error."""
    if not out.structured:
        out.line(output.event_stream_header())
    subscribed = False
    retry = TAIL_RETRY_MIN
    while True:
        try:
            async for event in client.tail_audit(after_seq=after):
                subscribed = True
                retry = TAIL_RETRY_MIN
                after = max(after, event.seq)
                out.record(output.event_json(event), output.event_stream_row(event))
            subscribed = True
        except errors.UnavailableError:
            if not subscribed:
                raise
        await asyncio.sleep(retry)
        retry = min(retry * 2, TAIL_RETRY_MAX)
