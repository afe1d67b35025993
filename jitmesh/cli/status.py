"""jitctl status: the mesh at a glance (admins)."""

from __future__ import annotations

from jitmesh.cli import output
from jitmesh.cli.core import Output, command
from jitmesh.client import Client


@command(
    None,
    "status",
    help="The mesh at a glance: agents connected, requests waiting, grants by state, revokes "
    "not yet acknowledged (admins).",
    examples=["jitctl status", "jitctl status -o json"],
)
async def status(client: Client, out: Output) -> None:
    found = await client.status()
    out.emit(output.status_json(found), output.status_details(found))
