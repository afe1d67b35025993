"""jitctl policy ...: see, change and test the access policy."""

from __future__ import annotations

import sys
from datetime import timedelta

import click

from jitmesh.cli import output
from jitmesh.cli.core import DURATION, NON_NEGATIVE, Output, UsageError, command, group
from jitmesh.client import Client

policy = group(
    None,
    "policy",
    help="See, change and test the access policy.",
    examples=[
        "jitctl policy show > policy.yaml",
        "jitctl policy apply -f policy.yaml --expected-version 3",
        "jitctl policy test --subject alice --action deploy --agent web-1",
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
    help="Validate a policy document and make it the running policy (admins).",
    examples=[
        "jitctl policy apply -f policy.yaml",
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
async def _apply(client: Client, out: Output, *, path: str, expected_version: int) -> None:
    text = _read_policy(path)
    if not text.strip():
        raise UsageError("the policy file is empty")
    doc = await client.apply_policy(text, expected_version=expected_version)
    out.emit(output.policy_json(doc), output.policy_details(doc))


@command(
    policy,
    "test",
    help="Would this subject get this action on this agent, and by which rule?",
    examples=[
        "jitctl policy test --subject alice --action deploy --agent web-1",
        "jitctl policy test --subject bob --group sre --action shell --agent db-1 --duration 2h",
    ],
)
@click.option("--subject", required=True, metavar="USER", help="Who asks.")
@click.option("--action", required=True, metavar="ACTION", help="What they ask for.")
@click.option("--agent", required=True, metavar="NAME", help="On which agent.")
@click.option("--duration", type=DURATION, help="For how long, such as 30m.")
@click.option(
    "--group", "groups", multiple=True, metavar="GROUP", help="A group of the subject (repeat)."
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
) -> None:
    decision = await client.test_policy(
        subject=subject, action=action, agent=agent, duration=duration, groups=list(groups)
    )
    out.emit(output.decision_json(decision), output.decision_details(decision))
