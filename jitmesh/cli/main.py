"""jitctl: the operator CLI. Parses arguments, calls the SDK, prints through `output`.

Exit codes: 0 success; 1 the coordinator refused or failed, or the awaited outcome did not
happen (denied, expired, broken audit chain, ...); 2 bad usage; 130 interrupted. Every failure is
one line on stderr, `jitctl: <reason>`, never a traceback and never the token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from typing import Any, NoReturn, TextIO, TypeAlias

from jitmesh import errors
from jitmesh.cli import output
from jitmesh.client import Client
from jitmesh.clock import Clock, SystemClock
from jitmesh.durations import DurationError, parse_duration
from jitmesh.types import Grant, GrantState, Lock, Request, RequestState, TokenInfo

DEFAULT_COORDINATOR = "127.0.0.1:7443"
ENV_COORDINATOR = "JITMESH_COORDINATOR"
ENV_TOKEN = "JITMESH_TOKEN"  # noqa: S105 (the name of a variable, not a secret)
ENV_CA_FILE = "JITMESH_CA_FILE"

DEFAULT_TIMEOUT = timedelta(seconds=10)
VERIFY_TIMEOUT = timedelta(seconds=60)
# Back-off between re-subscriptions of `audit tail` after the coordinator ended the stream.
TAIL_RETRY_MIN = 0.1
TAIL_RETRY_MAX = 5.0

# What `grant list` shows without --all or --state: grants that still hold, or may hold, access.
LIVE_GRANT_STATES = tuple(s for s in GrantState if not s.terminal)


class CommandFailed(Exception):
    """The command ran but its outcome is a failure (exit 1); the message is the one line."""


class UsageError(Exception):
    """Bad input found after argument parsing (exit 2)."""


# ---------------------------------------------------------------------------------------------
# Argument types: each turns text into a value or says, in one line, what is wrong.


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except DurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive whole number")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError("must be a whole number, 0 or more")
    return value


def _request_state(text: str) -> RequestState:
    try:
        return RequestState(text.upper())
    except ValueError:
        names = ", ".join(s.value.lower() for s in RequestState)
        raise argparse.ArgumentTypeError(f"state must be one of {names}") from None


def _grant_state(text: str) -> GrantState:
    try:
        return GrantState(text.upper())
    except ValueError:
        names = ", ".join(s.value.lower() for s in GrantState)
        raise argparse.ArgumentTypeError(f"state must be one of {names}") from None


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("labels look like KEY=VALUE")
    return key, value


@dataclass(frozen=True)
class Since:
    """--since: an RFC 3339 instant, or a duration meaning that long before now."""

    at: datetime | None = None
    ago: timedelta | None = None

    def resolve(self, now: datetime) -> datetime:
        if self.at is not None:
            return self.at
        assert self.ago is not None
        return now - self.ago


def _since(text: str) -> Since:
    try:
        return Since(ago=parse_duration(text))
    except DurationError:
        pass
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            "time must be RFC 3339 (2026-01-01T12:00:00Z) or a duration ago (1h)"
        ) from None
    if at.tzinfo is None:
        raise argparse.ArgumentTypeError("time needs a timezone, such as Z or +02:00")
    return Since(at=at.astimezone(UTC))


# ---------------------------------------------------------------------------------------------
# The parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: scripts and people read the same stderr.
        self.exit(2, f"jitctl: {message} (see '{self.prog} --help')\n")


def _common_options() -> _Parser:
    # SUPPRESS keeps an option given before the subcommand from being reset by the subparser's
    # default; real defaults (environment, then built-in) are applied after parsing.
    common = _Parser(add_help=False)
    group = common.add_argument_group("connection and output")
    group.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help=f"coordinator address (default: ${ENV_COORDINATOR} or {DEFAULT_COORDINATOR})",
    )
    group.add_argument(
        "--token",
        default=argparse.SUPPRESS,
        help=f"bearer token (default: ${ENV_TOKEN}); prefer the variable, argv is visible",
    )
    group.add_argument(
        "--ca-file",
        metavar="PEM",
        default=argparse.SUPPRESS,
        help=f"CA certificate of the coordinator (default: ${ENV_CA_FILE}; none: the system's "
        "trust store; $JITMESH_INSECURE=1: plain text, for a dev coordinator)",
    )
    group.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default=argparse.SUPPRESS,
        help="output format (default: table)",
    )
    group.add_argument(
        "--timeout",
        type=_duration,
        metavar="DURATION",
        default=argparse.SUPPRESS,
        help="deadline of each call to the coordinator (default: 10s)",
    )
    return common


Handler = Callable[[Client, argparse.Namespace, "Output"], Awaitable[int]]
# argparse has no public name for what add_subparsers returns, and it is generic only in typeshed.
_Subparsers: TypeAlias = "argparse._SubParsersAction[_Parser]"


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = _Parser(
        prog="jitctl",
        description="Operate a jitmesh coordinator: requests, grants, agents, policy, audit.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"jitctl {_version()}")
    nouns = parser.add_subparsers(dest="noun", metavar="COMMAND", required=True)

    def group(parent: _Subparsers, name: str, help: str) -> _Subparsers:
        sub = parent.add_parser(name, help=help, description=help, parents=[common])
        return sub.add_subparsers(dest=f"{name}_verb", metavar="COMMAND", required=True)

    def command(parent: _Subparsers, name: str, handler: Handler, help: str) -> _Parser:
        sub = parent.add_parser(name, help=help, description=help, parents=[common])
        sub.set_defaults(handler=handler)
        return sub

    # request
    requests = group(nouns, "request", "ask for access, and review requests")
    p = command(requests, "create", _request_create, "ask for an action on an agent")
    p.add_argument("--agent", required=True, metavar="NAME")
    p.add_argument("--action", required=True)
    p.add_argument("--duration", required=True, type=_duration, help="e.g. 15m, 1h30m")
    p.add_argument("--reason", default="")
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait for approval and for the agent to apply the grant (exit 1 if it does not)",
    )
    p.add_argument(
        "--wait-timeout",
        type=_duration,
        default=timedelta(minutes=10),
        metavar="DURATION",
        help="give up waiting after this long (default: 10m)",
    )
    p = command(requests, "list", _request_list, "list requests")
    p.add_argument("--state", action="append", type=_request_state, default=[])
    p.add_argument("--agent", default="", metavar="NAME")
    p.add_argument("--subject", default="", metavar="USER")
    p.add_argument("--limit", type=_positive_int, metavar="N")
    p = command(requests, "show", _request_show, "show one request")
    p.add_argument("id", metavar="ID")
    p = command(requests, "approve", _request_approve, "approve a pending request")
    p.add_argument("id", metavar="ID")
    p.add_argument("--reason", default="")
    p = command(requests, "deny", _request_deny, "deny a pending request")
    p.add_argument("id", metavar="ID")
    p.add_argument("--reason", default="")
    p = command(requests, "cancel", _request_cancel, "withdraw your pending request")
    p.add_argument("id", metavar="ID")

    # grant
    grants = group(nouns, "grant", "see and end grants")
    p = command(grants, "list", _grant_list, "list grants (by default only live ones)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--state", action="append", type=_grant_state, default=[])
    which.add_argument("--all", action="store_true", help="include ended grants")
    p.add_argument("--agent", default="", metavar="NAME")
    p.add_argument("--subject", default="", metavar="USER")
    p.add_argument("--limit", type=_positive_int, metavar="N")
    p = command(grants, "show", _grant_show, "show one grant")
    p.add_argument("id", metavar="ID")
    p = command(grants, "revoke", _grant_revoke, "take a grant away before it expires")
    p.add_argument("id", metavar="ID")
    p.add_argument("--reason", default="")
    p = command(grants, "release", _grant_release, "hand your grant back early")
    p.add_argument("id", metavar="ID")

    # agent
    agents = group(nouns, "agent", "see, enroll and remove agents")
    command(agents, "list", _agent_list, "list agents and whether they are connected")
    p = command(agents, "show", _agent_show, "show one agent")
    p.add_argument("name", metavar="NAME")
    tokens = group(agents, "token", "join tokens for enrolling agents")
    p = command(tokens, "create", _agent_token_create, "create a one-time join token")
    p.add_argument(
        "--label", action="append", type=_label, default=[], metavar="KEY=VALUE", dest="labels"
    )
    p.add_argument("--ttl", type=_duration, metavar="DURATION")
    p.add_argument(
        "--replace",
        default="",
        metavar="NAME",
        help="enroll this already enrolled agent again (a reinstalled host): its old "
        "certificate stops working; without --label its labels are kept",
    )
    p = command(agents, "remove", _agent_remove, "forget an agent and revoke its grants")
    p.add_argument("name", metavar="NAME")

    # locks
    locks = group(nouns, "lock", "emergency stop: end and refuse access (admins)")
    p = command(locks, "create", _lock_create, "revoke matching grants now and refuse new ones")
    p.add_argument("--subject", default="", metavar="USER")
    p.add_argument("--agent", default="", metavar="NAME")
    p.add_argument("--action", default="", metavar="ACTION")
    p.add_argument("--reason", required=True)
    p.add_argument("--ttl", type=_duration, metavar="DURATION", help="default: until lifted")
    p = command(locks, "list", _lock_list, "list locks in force")
    p.add_argument("--all", action="store_true", help="include lifted and expired locks")
    p = command(locks, "lift", _lock_lift, "end a lock")
    p.add_argument("id", metavar="ID")
    p.add_argument("--reason", default="")

    # operator tokens and users
    optokens = group(nouns, "token", "operator bearer tokens (admins)")
    p = command(optokens, "create", _token_create, "a new token for a user, shown once")
    p.add_argument("user", metavar="USER")
    p.add_argument("--group", action="append", default=[], dest="groups", metavar="GROUP")
    p.add_argument("--ttl", type=_duration, metavar="DURATION", help="default 30d, at most 365d")
    p.add_argument("--label", default="")
    p = command(optokens, "list", _token_list, "list tokens (never the tokens themselves)")
    p.add_argument("--user", default="", metavar="USER")
    p = command(optokens, "revoke", _token_revoke, "revoke a token by its id")
    p.add_argument("id", metavar="ID")
    certs = group(nouns, "cert", "operator client certificates (admins)")
    p = command(certs, "revoke", _cert_revoke, "refuse a certificate by its serial from now on")
    p.add_argument("serial", metavar="SERIAL", help="hexadecimal, as openssl x509 -serial shows")
    p.add_argument("--reason", default="")
    users = group(nouns, "user", "disable or enable operators (admins)")
    p = command(users, "disable", _user_disable, "refuse every call of a user from now on")
    p.add_argument("user", metavar="USER")
    p = command(users, "enable", _user_enable, "let a disabled user back in")
    p.add_argument("user", metavar="USER")

    # policy
    policy = group(nouns, "policy", "see, change and test the access policy")
    command(policy, "show", _policy_show, "print the running policy")
    p = command(policy, "apply", _policy_apply, "validate and apply a policy document")
    p.add_argument("-f", "--file", required=True, metavar="FILE", help="YAML file, - for stdin")
    p.add_argument(
        "--expected-version",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="refuse unless the running policy is version N",
    )
    p = command(policy, "test", _policy_test, "would this subject get this action, and why?")
    p.add_argument("--subject", required=True, metavar="USER")
    p.add_argument("--action", required=True)
    p.add_argument("--agent", required=True, metavar="NAME")
    p.add_argument("--duration", type=_duration)
    p.add_argument("--group", action="append", default=[], dest="groups", metavar="GROUP")

    # audit
    audit = group(nouns, "audit", "read and verify the audit log")
    p = command(audit, "list", _audit_list, "list audit events")
    p.add_argument("--since", type=_since, metavar="TIME", help="RFC 3339, or 1h for an hour ago")
    p.add_argument("--agent", default="", metavar="NAME")
    p.add_argument("--subject", default="", metavar="USER")
    p.add_argument("--kind", default="", metavar="K")
    p.add_argument("--grant", default="", metavar="ID")
    p.add_argument("--request", default="", metavar="ID")
    p.add_argument("--limit", type=_positive_int, metavar="N")
    command(audit, "verify", _audit_verify, "check the hash chain; exit 1 if it is broken")
    command(
        audit,
        "export",
        _audit_export,
        "write the log, signed checkpoints and public keys as JSON lines (stdout)",
    )
    p = command(audit, "tail", _audit_tail, "print events as they are written (Ctrl-C stops)")
    p.add_argument("--after-seq", type=_non_negative_int, default=0, metavar="SEQ")
    return parser


def _version() -> str:
    try:
        return metadata.version("jitmesh")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Output


class Output:
    """Where a command's result goes, in the format asked for, and the time it is shown at."""

    def __init__(self, fmt: str, clock: Clock, stream: TextIO) -> None:
        self.json = fmt == "json"
        self._clock = clock
        self._stream = stream

    @property
    def now(self) -> datetime:
        # Read when used: `request create --wait` may print minutes after it started.
        return self._clock.now()

    def emit(self, value: output.JSON | list[output.JSON], text: str) -> None:
        self.line(output.dumps(value) if self.json else text)

    def line(self, text: str) -> None:
        print(text, file=self._stream, flush=True)


# ---------------------------------------------------------------------------------------------
# Commands: each is parse-free and format-free.


def _settled(request: Request) -> bool:
    """Nothing more to wait for: decided, and if approved, the agent has answered."""
    if request.state is RequestState.PENDING:
        return False
    if request.state is not RequestState.APPROVED:
        return True
    return request.grant_state not in (None, GrantState.PENDING_DELIVERY)


def _wait_failure(request: Request, grant: Grant | None) -> str | None:
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


async def _request_create(client: Client, args: argparse.Namespace, out: Output) -> int:
    request, grant = await client.create_request(
        agent=args.agent, action=args.action, duration=args.duration, reason=args.reason
    )
    if not args.wait:
        out.emit(
            output.request_json(request, grant), output.request_details(request, out.now, grant)
        )
        return 0
    if not out.json:
        # Show the id at once: it is what approvers are told while we wait.
        out.line(output.request_details(request, out.now, grant))
    final = await client.wait_for_request(request.id, until=_settled, timeout=args.wait_timeout)
    grant = await client.get_grant(final.grant_id) if final.grant_id else None
    failure = _wait_failure(final, grant)
    if out.json:
        out.line(output.dumps(output.request_json(final, grant)))
    elif grant is not None and failure is None:
        out.line(
            f"grant {grant.id} is active on {grant.agent} until "
            f"{output.human_time(grant.expires_at)} ({output.relative(grant.expires_at, out.now)})"
        )
    if failure is not None:
        raise CommandFailed(failure)
    return 0


async def _request_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    requests = await client.list_requests(
        states=args.state, subject=args.subject, agent=args.agent, limit=args.limit
    )
    out.emit([output.request_json(r) for r in requests], output.requests_table(requests))
    return 0


async def _request_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    request = await client.get_request(args.id)
    out.emit(output.request_json(request), output.request_details(request, out.now))
    return 0


async def _request_approve(client: Client, args: argparse.Namespace, out: Output) -> int:
    request, grant = await client.approve(args.id, reason=args.reason)
    out.emit(output.request_json(request, grant), output.request_details(request, out.now, grant))
    return 0


async def _request_deny(client: Client, args: argparse.Namespace, out: Output) -> int:
    request = await client.deny(args.id, reason=args.reason)
    out.emit(output.request_json(request), output.request_details(request, out.now))
    return 0


async def _request_cancel(client: Client, args: argparse.Namespace, out: Output) -> int:
    request = await client.cancel(args.id)
    out.emit(output.request_json(request), output.request_details(request, out.now))
    return 0


async def _grant_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    states = args.state or (() if args.all else LIVE_GRANT_STATES)
    grants = await client.list_grants(
        states=states, subject=args.subject, agent=args.agent, limit=args.limit
    )
    out.emit([output.grant_json(g) for g in grants], output.grants_table(grants, out.now))
    return 0


async def _grant_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    grant = await client.get_grant(args.id)
    out.emit(output.grant_json(grant), output.grant_details(grant, out.now))
    return 0


async def _grant_revoke(client: Client, args: argparse.Namespace, out: Output) -> int:
    grant = await client.revoke_grant(args.id, reason=args.reason)
    out.emit(output.grant_json(grant), output.grant_details(grant, out.now))
    return 0


async def _grant_release(client: Client, args: argparse.Namespace, out: Output) -> int:
    grant = await client.release_grant(args.id)
    out.emit(output.grant_json(grant), output.grant_details(grant, out.now))
    return 0


async def _agent_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    agents = await client.list_agents()
    out.emit([output.agent_json(a) for a in agents], output.agents_table(agents, out.now))
    return 0


async def _agent_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    agent = await client.get_agent(args.name)
    out.emit(output.agent_json(agent), output.agent_details(agent, out.now))
    return 0


async def _agent_token_create(client: Client, args: argparse.Namespace, out: Output) -> int:
    labels = dict(args.labels)
    token = await client.create_join_token(labels=labels, ttl=args.ttl, replaces=args.replace)
    out.emit(
        output.join_token_json(token, labels), output.join_token_details(token, labels, out.now)
    )
    return 0


def _token_json(info: TokenInfo) -> dict[str, str | None]:
    return {
        "id": info.id,
        "user": info.user,
        "label": info.label,
        "created_at": info.created_at.isoformat(),
        "expires_at": info.expires_at.isoformat() if info.expires_at else None,
        "revoked_at": info.revoked_at.isoformat() if info.revoked_at else None,
    }


async def _token_create(client: Client, args: argparse.Namespace, out: Output) -> int:
    token, info = await client.create_token(
        args.user, groups=args.groups, ttl=args.ttl, label=args.label
    )
    expires = info.expires_at.isoformat() if info.expires_at else "never"
    out.emit(
        {"token": token, **_token_json(info)},
        f"TOKEN    {token}\nID       {info.id}\nUSER     {info.user}\nEXPIRES  {expires}\n"
        "(shown once: the coordinator keeps only its hash)",
    )
    return 0


async def _token_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    tokens = await client.list_tokens(args.user)
    lines = ["ID                USER            EXPIRES                    REVOKED"]
    for t in tokens:
        expires = t.expires_at.isoformat(timespec="seconds") if t.expires_at else "never"
        revoked = t.revoked_at.isoformat(timespec="seconds") if t.revoked_at else "-"
        lines.append(f"{t.id:<17} {output.cell(t.user):<15} {expires:<26} {revoked}")
    out.emit([_token_json(t) for t in tokens], "\n".join(lines))
    return 0


async def _token_revoke(client: Client, args: argparse.Namespace, out: Output) -> int:
    await client.revoke_token(args.id)
    out.emit({"revoked": args.id}, f"revoked token {args.id}")
    return 0


def _lock_state(lock: Lock) -> str:
    if lock.lifted_at is not None:
        return "lifted"
    return "active" if lock.in_force(datetime.now(UTC)) else "expired"


def _lock_json(lock: Lock) -> dict[str, Any]:
    return {
        "id": lock.id,
        "state": _lock_state(lock),
        "subject": lock.target.subject,
        "agent": lock.target.agent,
        "action": lock.target.action,
        "reason": lock.reason,
        "created_by": lock.created_by,
        "created_at": output.rfc3339(lock.created_at),
        "expires_at": output.rfc3339(lock.expires_at),
        "lifted_at": output.rfc3339(lock.lifted_at),
        "lifted_by": lock.lifted_by,
    }


async def _lock_create(client: Client, args: argparse.Namespace, out: Output) -> int:
    lock, revoked, denied = await client.create_lock(
        subject=args.subject, agent=args.agent, action=args.action, reason=args.reason,
        ttl=args.ttl,
    )  # fmt: skip
    out.emit(
        {**_lock_json(lock), "grants_revoked": revoked, "requests_denied": denied},
        f"locked {output.cell(lock.target.describe())} ({lock.id}); "
        f"grants revoked: {revoked}, pending requests denied: {denied}",
    )
    return 0


async def _lock_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    locks = await client.list_locks(include_ended=args.all)
    lines = [f"{'ID':<37} {'TARGET':<31} {'STATE':<8} REASON"]
    for lock in locks:
        target = output.cell(lock.target.describe())
        lines.append(
            f"{lock.id:<37} {target:<31} {_lock_state(lock):<8} {output.cell(lock.reason)}"
        )
    out.emit([_lock_json(x) for x in locks], "\n".join(lines))
    return 0


async def _lock_lift(client: Client, args: argparse.Namespace, out: Output) -> int:
    lock = await client.lift_lock(args.id, reason=args.reason)
    out.emit(_lock_json(lock), f"lifted {lock.id}")
    return 0


async def _cert_revoke(client: Client, args: argparse.Namespace, out: Output) -> int:
    await client.revoke_certificate(args.serial, reason=args.reason)
    out.emit({"revoked_certificate": args.serial}, f"revoked certificate {args.serial}")
    return 0


async def _user_disable(client: Client, args: argparse.Namespace, out: Output) -> int:
    await client.set_user_disabled(args.user, True)
    out.emit({"disabled": args.user}, f"disabled {args.user}")
    return 0


async def _user_enable(client: Client, args: argparse.Namespace, out: Output) -> int:
    await client.set_user_disabled(args.user, False)
    out.emit({"enabled": args.user}, f"enabled {args.user}")
    return 0


async def _agent_remove(client: Client, args: argparse.Namespace, out: Output) -> int:
    await client.remove_agent(args.name)
    out.emit(output.removed_json(args.name), output.removed_table(args.name))
    return 0


async def _policy_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    doc = await client.get_policy()
    out.emit(output.policy_json(doc), output.policy_yaml(doc))
    return 0


def _read_policy(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise UsageError(f"cannot read policy file {path}: {reason}") from None


async def _policy_apply(client: Client, args: argparse.Namespace, out: Output) -> int:
    text = _read_policy(args.file)
    if not text.strip():
        raise UsageError("the policy file is empty")
    doc = await client.apply_policy(text, expected_version=args.expected_version)
    out.emit(output.policy_json(doc), output.policy_details(doc))
    return 0


async def _policy_test(client: Client, args: argparse.Namespace, out: Output) -> int:
    decision = await client.test_policy(
        subject=args.subject,
        action=args.action,
        agent=args.agent,
        duration=args.duration,
        groups=args.groups,
    )
    out.emit(output.decision_json(decision), output.decision_details(decision))
    return 0


async def _audit_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    events = await client.list_audit(
        since=args.since.resolve(out.now) if args.since else None,
        agent=args.agent,
        subject=args.subject,
        kind=args.kind,
        grant_id=args.grant,
        request_id=args.request,
        limit=args.limit,
    )
    out.emit([output.event_json(e) for e in events], output.events_table(events))
    return 0


async def _audit_verify(client: Client, args: argparse.Namespace, out: Output) -> int:
    # Walking the whole chain takes longer than a lookup: a longer deadline unless one was given.
    timeout = args.timeout or VERIFY_TIMEOUT
    result = await client.verify_audit(timeout=timeout.total_seconds())
    out.emit(output.verification_json(result), output.verification_details(result))
    if not result.ok:
        problem = f": {result.problem}" if result.problem else ""
        raise CommandFailed(f"audit chain is broken at seq {result.first_bad_seq}{problem}")
    return 0


async def _audit_export(client: Client, args: argparse.Namespace, out: Output) -> int:
    # Always JSON lines, whatever -o says: the format an outside verifier reads.
    async for record in client.export_audit():
        out.line(json.dumps(record, ensure_ascii=False, sort_keys=True))
    return 0


async def _audit_tail(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Follow the log like `tail -F`: when the coordinator ends the stream (a restart, a
    recycled connection), subscribe again after the last event shown, so nothing is printed
    twice or skipped. Only a coordinator that cannot be reached at all is an error."""
    if not out.json:
        out.line(output.event_stream_header())
    after = args.after_seq
    subscribed = False
    retry = TAIL_RETRY_MIN
    while True:
        try:
            async for event in client.tail_audit(after_seq=after):
                subscribed = True
                retry = TAIL_RETRY_MIN
                after = max(after, event.seq)
                out.line(
                    output.dumps_line(output.event_json(event))
                    if out.json
                    else output.event_stream_row(event)
                )
            subscribed = True
        except errors.UnavailableError:
            if not subscribed:
                raise
        await asyncio.sleep(retry)
        retry = min(retry * 2, TAIL_RETRY_MAX)


# ---------------------------------------------------------------------------------------------
# Entry point


def _settings(args: argparse.Namespace) -> None:
    """Apply defaults for the global options: the flag, then the environment, then built-in."""
    args.coordinator = (
        getattr(args, "coordinator", None) or os.environ.get(ENV_COORDINATOR) or DEFAULT_COORDINATOR
    )
    args.token = getattr(args, "token", None) or os.environ.get(ENV_TOKEN) or None
    # The SDK applies $JITMESH_CA_FILE and $JITMESH_INSECURE (jitmesh.tls); a flag beats them.
    args.ca_file = getattr(args, "ca_file", None) or None
    args.output = getattr(args, "output", "table")
    # None: the command's own default (most calls DEFAULT_TIMEOUT, audit verify longer).
    args.timeout = getattr(args, "timeout", None)


async def _run(args: argparse.Namespace, out: Output) -> int:
    handler: Handler = args.handler
    async with await Client.connect(
        args.coordinator,
        token=args.token,
        ca_file=args.ca_file,
        timeout=(args.timeout or DEFAULT_TIMEOUT).total_seconds(),
    ) as client:
        return await handler(client, args, out)


def _fail(message: str, code: int) -> int:
    # Reasons can carry coordinator text (a deny reason, an agent's failure): keep it one line.
    print(f"jitctl: {output.cell(message)}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None, *, clock: Clock | None = None) -> int:
    """Run jitctl with `argv` (default: the process arguments) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # --help and --version exit 0; usage errors exit 2 after their one line.
        return exc.code if isinstance(exc.code, int) else 2
    _settings(args)
    out = Output(args.output, clock or SystemClock(), sys.stdout)
    try:
        return asyncio.run(_run(args, out))
    except errors.AuthenticationError as exc:
        hint = "" if args.token else f" (no token given: use --token or ${ENV_TOKEN})"
        return _fail(f"{exc}{hint}", 1)
    except (errors.JitmeshError, CommandFailed) as exc:
        return _fail(str(exc), 1)
    except UsageError as exc:
        return _fail(str(exc), 2)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (jitctl ... | head): not an error worth a line. Point stdout at
        # devnull so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as exc:
        # A bug here or below: still one line, still without the token, but with the type so a
        # report can say where to look.
        message = str(exc)
        if args.token:
            message = message.replace(args.token, "[redacted]")
        return _fail(f"unexpected error ({type(exc).__name__}): {message}", 1)


if __name__ == "__main__":
    sys.exit(main())
