"""jitctl policy ...: see, change and test the access policy."""

from __future__ import annotations

import difflib
import sys
from datetime import timedelta

import click

from jitmesh import errors
from jitmesh.cli import output
from jitmesh.cli.core import (
    DURATION,
    NON_NEGATIVE,
    Output,
    PolicyDenies,
    UsageError,
    command,
    group,
)
from jitmesh.client import Client

policy = group(
    None,
    "policy",
    help="See, change and test the access policy.",
    examples=[
        "jitctl policy show > policy.yaml",
        "jitctl policy apply -f policy.yaml --dry-run",
        "jitctl policy test --subject alice --action deploy --agent web-1",
        "jitctl policy test -f policy.yaml --subject alice --action deploy --agent web-1",
    ],
)


@command(
    policy,
    "show",
    help="Print the running policy (YAML you can edit and apply again).",
    examples=["jitctl policy show > policy.yaml", "jitctl policy show -o json"],
)
async def _show(client: Client, out: Output) -> None:
    doc = await client.get_policy()
    out.emit(output.policy_json(doc), output.policy_yaml(doc))


def _read_policy(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise UsageError(f"cannot read policy file {path}: {reason}") from None


@command(
    policy,
    "apply",
    help="Validate a policy document and make it the running policy (admins). With --dry-run, "
    "only validate it and print its changes against the running policy.",
    examples=[
        "jitctl policy apply -f policy.yaml",
        "jitctl policy apply -f policy.yaml --dry-run",
        "jitctl policy apply -f policy.yaml --expected-version 3",
        "cat policy.yaml | jitctl policy apply -f -",
    ],
)
@click.option("-f", "--file", "path", required=True, metavar="FILE", help="YAML file, - for stdin.")
@click.option(
    "--expected-version",
    type=NON_NEGATIVE,
    default=0,
    metavar="N",
    help="Refuse unless the running policy is version N (0: any).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Validate only and print the diff against the running policy; nothing changes.",
)
async def _apply(
    client: Client, out: Output, *, path: str, expected_version: int, dry_run: bool
) -> None:
    text = _read_policy(path)
    if not text.strip():
        raise UsageError("the policy file is empty")
    if not dry_run:
        doc = await client.apply_policy(text, expected_version=expected_version)
        out.emit(output.policy_json(doc), output.policy_details(doc))
        return
    try:
        running = await client.get_policy()
    except errors.NotFoundError:
        running = None
    doc = await client.apply_policy(text, expected_version=expected_version, dry_run=True)
    diff = policy_diff(running.yaml if running else "", doc.yaml, running.version if running else 0)
    changed = bool(diff)
    value = {**output.policy_json(doc), "dry_run": True, "changed": changed, "diff": diff}
    if changed:
        text_out = diff.rstrip("\n")
    else:
        text_out = f"no changes: the document is the running policy (v{doc.version - 1})"
    out.emit(value, text_out)


def policy_diff(running: str, proposed: str, version: int) -> str:
    """A unified diff from the running policy (version `version`) to the proposed document;
    empty when they are the same text."""
    lines = difflib.unified_diff(
        running.splitlines(keepends=True),
        proposed.splitlines(keepends=True),
        fromfile=f"running (v{version})" if version else "running (none)",
        tofile="proposed",
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


@command(
    policy,
    "test",
    help="Would this subject get this action on this agent, and by which rule? Exits 5 when "
    "the answer is deny. With -f, asks a policy document before it is applied.",
    examples=[
        "jitctl policy test --subject alice --action deploy --agent web-1",
        "jitctl policy test --subject bob --group sre --action shell --agent db-1 --duration 2h",
        "jitctl policy test -f policy.yaml --subject alice --action deploy --agent web-1",
    ],
)
@click.option("--subject", required=True, metavar="USER", help="Who asks.")
@click.option("--action", required=True, metavar="ACTION", help="What they ask for.")
@click.option("--agent", required=True, metavar="NAME", help="On which agent.")
@click.option("--duration", type=DURATION, help="For how long, such as 30m.")
@click.option(
    "--group", "groups", multiple=True, metavar="GROUP", help="A group of the subject (repeat)."
)
@click.option(
    "-f",
    "--file",
    "path",
    metavar="FILE",
    help="Test this policy document (YAML, - for stdin) instead of the running policy.",
)
async def _test(
    client: Client,
    out: Output,
    *,
    subject: str,
    action: str,
    agent: str,
    duration: timedelta | None,
    groups: tuple[str, ...],
    path: str | None,
) -> None:
    document = ""
    if path is not None:
        document = _read_policy(path)
        if not document.strip():
            raise UsageError("the policy file is empty")
    decision = await client.test_policy(
        subject=subject,
        action=action,
        agent=agent,
        duration=duration,
        groups=list(groups),
        policy_yaml=document,
    )
    out.emit(output.decision_json(decision), output.decision_details(decision))
    if not decision.allowed:
        raise PolicyDenies(f"denied: {decision.explanation}")
