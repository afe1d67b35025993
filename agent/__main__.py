"""`jitmesh-agent`: run the agent, or answer a local access check from its lease table.

    jitmesh-agent [run] --coordinator ADDR --name NAME --join-token TOKEN --state DIR
                        [--label KEY=VALUE ...] [--enforcer KIND:WHERE ...]
    jitmesh-agent check --state DIR [--subject USER | --pam] --action ACTION
    jitmesh-agent exec --state DIR [--subject USER] --action ACTION [--release]
                       [--request --duration 15m --reason TEXT] -- COMMAND ...

The only place that parses flags, loads configuration and sets up logging. `check` and `exec`
import as little as possible (check runs on every login or sudo call): they talk to the running
agent over its socket in the state directory.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from agent.config import AgentConfig

EXIT_OK = 0
EXIT_DENIED = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["check"]:
        return check(args[1:])
    if args[:1] == ["exec"]:
        return exec_command(args[1:])
    if args[:1] == ["run"]:
        args = args[1:]
    return run(args)


# check


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (callers such as pam_exec log stderr line by line)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def check(argv: Sequence[str]) -> int:
    parser = _OneLineParser(
        prog="jitmesh-agent check",
        description="Exit 0 if SUBJECT (by default: you) may do ACTION now, 1 if not (2 on usage "
        "or state errors). Asks the running agent over its socket, which knows who you are; "
        "only root may name another subject. With the agent down, root's check reads the lease "
        "table instead.",
    )
    parser.add_argument("--state", required=True, type=Path, help="the agent's state directory")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--subject", help="whom to check (root only; default: the caller)")
    who.add_argument(
        "--pam",
        action="store_true",
        help="for pam_exec: the subject is PAM_USER from the environment",
    )
    parser.add_argument("--action", required=True)
    args = parser.parse_args(argv)

    import time

    from agent.domain.errors import StateError
    from agent.local.client import Unreachable, ask
    from agent.store.readonly import DB_NAME, find_allowing
    from jitmesh import validation

    subject = os.environ.get("PAM_USER", "") if args.pam else args.subject
    try:
        if subject is not None:
            validation.check(validation.SUBJECT, subject, "subject")
        validation.check(validation.ACTION, args.action, "action")
    except validation.ValidationError as exc:
        return _fail(f"check: {exc}")
    try:
        answer = ask(args.state, {"method": "check", "subject": subject, "action": args.action})
    except Unreachable:
        answer = None
    if answer is not None:
        if not answer.get("ok"):
            return _fail(f"check: {answer.get('error', 'refused')}")
        if not answer.get("allowed"):
            print("not allowed")
            return EXIT_DENIED
        print(f"allowed: grant {answer['grant_id']} until {answer['not_after']}")
        return EXIT_OK
    # The agent is not running: the lease table still answers (expired grants are refused by
    # their own not_after), for whoever can read it (root).
    if subject is None:
        return _fail("check: the agent is not running")
    if os.geteuid() != 0:
        import pwd

        if subject != pwd.getpwuid(os.getuid()).pw_name:
            return _fail("check: only root may name another subject (--subject)")
    now_ms = time.time_ns() // 1_000_000
    try:
        found = find_allowing(args.state / DB_NAME, subject, args.action, now_ms)
    except StateError as exc:
        return _fail(f"check: {exc}")
    if found is None:
        print("not allowed")
        return EXIT_DENIED
    print(f"allowed: grant {found.grant_id} until {_iso_ms(found.not_after_ms)}")
    return EXIT_OK


def exec_command(argv: Sequence[str]) -> int:
    args = list(argv)
    if "--" not in args:
        return _fail("exec: put the command after --, e.g. exec --action A -- CMD ARGS")
    split = args.index("--")
    command = args[split + 1 :]
    parser = _OneLineParser(
        prog="jitmesh-agent exec",
        description="Run COMMAND only while a grant lets SUBJECT (by default: you) do ACTION on "
        "this host: in its own process group, as the subject's user when run by root, ended "
        "(SIGTERM, then SIGKILL) when the grant is revoked, expires or is locked. The exit code "
        "is the command's. Start, exit and duration are audited.",
    )
    parser.add_argument("--state", required=True, type=Path, help="the agent's state directory")
    parser.add_argument("--subject", help="root only: the subject (default: the caller)")
    parser.add_argument("--action", required=True)
    parser.add_argument(
        "--release", action="store_true", help="release the grant when the command ends"
    )
    parser.add_argument(
        "--run-as-root", action="store_true", help="root only: run as root, not as the subject"
    )
    parser.add_argument(
        "--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL"
    )
    parser.add_argument(
        "--request",
        action="store_true",
        help="first file a request with your own credentials (JITMESH_COORDINATOR, "
        "JITMESH_TOKEN) and wait until it is approved and applied here",
    )
    parser.add_argument("--duration", help="with --request: how long, e.g. 15m")
    parser.add_argument("--reason", default="", help="with --request: why (e.g. INC-42)")
    parsed = parser.parse_args(args[:split])
    if not command or not command[0]:
        return _fail("exec: no command after --")
    duration = None
    if parsed.request:
        if not parsed.duration:
            return _fail("exec: --request needs --duration (e.g. 15m)")
        from jitmesh.durations import DurationError, parse_duration

        try:
            duration = parse_duration(parsed.duration)
        except DurationError as exc:
            return _fail(f"exec: --duration: {exc}")
    elif parsed.duration or parsed.reason:
        return _fail("exec: --duration and --reason go with --request")
    from agent.local.runner import ExecOptions, run

    return run(
        ExecOptions(
            state_dir=parsed.state,
            subject=parsed.subject,
            action=parsed.action,
            argv=command,
            release=parsed.release,
            run_as_root=parsed.run_as_root,
            grace=parsed.grace,
            request_duration=duration,
            request_reason=parsed.reason,
        )
    )


def _iso_ms(ms: int) -> str:
    from datetime import UTC, datetime, timedelta

    at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    return at.isoformat(timespec="seconds").replace("+00:00", "Z")


# run


def run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="jitmesh-agent",
        description="Run the jitmesh agent (see also: jitmesh-agent check --help).",
    )
    parser.add_argument(
        "--coordinator",
        default=os.environ.get("JITMESH_COORDINATOR"),
        help="coordinator address host:port (env JITMESH_COORDINATOR)",
    )
    parser.add_argument("--name", required=True, help="this agent's name")
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="repeatable; asked for at enrollment, which the coordinator refuses unless the join "
        "token gives the same label (the agent gets the token's labels)",
    )
    parser.add_argument(
        "--join-token",
        default=os.environ.get("JITMESH_JOIN_TOKEN"),
        help="one-time join token for enrollment (env JITMESH_JOIN_TOKEN)",
    )
    parser.add_argument(
        "--ca-file",
        type=Path,
        default=None,
        help="the coordinator's CA certificate (its DATA/ca/ca.pem): the agent enrolls over TLS "
        "and connects with mTLS (env JITMESH_CA_FILE); one of --ca-file and --insecure is needed",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="plain text, for a development or --insecure coordinator (env JITMESH_INSECURE=1)",
    )
    parser.add_argument("--state", required=True, type=Path, help="state directory")
    parser.add_argument(
        "--enforcer",
        action="append",
        default=[],
        metavar="file:DIR|exec:FILE|sudo:TOML|group:TOML|ssh:TOML",
        help="repeatable; applied in the order given. file,drift=report:DIR (or exec,...) "
        "only reports access on the host no lease holds instead of removing it",
    )
    parser.add_argument("--backoff-base", type=float, default=1.0, metavar="SECONDS")
    parser.add_argument("--backoff-cap", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="heartbeat interval when the coordinator's Welcome names none",
    )
    # Defaults: the production column of PROMISES.md's starting parameters.
    parser.add_argument("--keepalive", type=float, default=30.0, metavar="SECONDS")
    parser.add_argument(
        "--keepalive-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="HTTP/2 ping timeout: a silently dead connection is noticed after about "
        "keepalive + timeout",
    )
    parser.add_argument(
        "--remove-retries",
        type=int,
        default=6,
        help="attempts to remove access for a revoke before it is reported REVOKE_FAILED",
    )
    parser.add_argument(
        "--remove-retry-base",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="first delay between remove attempts (doubling, +-50 %%)",
    )
    parser.add_argument(
        "--skew-tolerance",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="grants issued further than this from the agent's clock are refused",
    )
    parser.add_argument(
        "--reconcile-every",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how often the host is compared with the lease table (drift removed)",
    )
    parser.add_argument(
        "--exec-grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="when a grant ends: seconds between SIGTERM and SIGKILL for its exec commands",
    )
    parser.add_argument(
        "--end-sessions",
        choices=["exec", "user"],
        default="exec",
        help="user: also end every process of the subject's user when their last grant here "
        "ends (for users that exist on the host only for jitmesh access)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    args = parser.parse_args(argv)
    if not args.coordinator:
        parser.error("--coordinator (or JITMESH_COORDINATOR) is required")

    from agent.config import AgentConfig, EnforcerConfig, parse_enforcer
    from agent.domain.errors import AgentError, ConfigError
    from jitmesh import errors, tls

    try:
        # The rule every client keeps (jitmesh.tls); a flag beats the environment. The agent
        # cannot use the system's trust store: its mTLS port's certificate is the internal CA's.
        transport = tls.choose(args.coordinator, ca_file=args.ca_file, insecure=args.insecure)
        if transport.ca_file is not None:
            tls.read_ca_file(transport.ca_file)
    except errors.JitmeshError as exc:
        return _fail(f"configuration: {exc}")
    try:
        labels = dict(_label(text) for text in args.label)
        enforcers: list[EnforcerConfig] = []
        for number, text in enumerate(args.enforcer, 1):
            try:
                enforcers.append(parse_enforcer(text))
            except ConfigError as exc:
                raise ConfigError(f"--enforcer number {number}: {exc}") from None
        config = AgentConfig(
            coordinator=args.coordinator,
            name=args.name,
            labels=labels,
            join_token=args.join_token or None,
            ca_file=transport.ca_file,
            insecure=transport.insecure,
            state_dir=args.state,
            enforcers=tuple(enforcers),
            backoff_base=args.backoff_base,
            backoff_cap=args.backoff_cap,
            heartbeat=args.heartbeat,
            keepalive_time=args.keepalive,
            keepalive_timeout=args.keepalive_timeout,
            remove_retries=args.remove_retries,
            remove_retry_base=args.remove_retry_base,
            skew_tolerance=args.skew_tolerance,
            reconcile_every=args.reconcile_every,
            exec_grace=args.exec_grace,
            end_sessions=args.end_sessions,
        )
    except AgentError as exc:
        return _fail(f"configuration: {exc}")

    _setup_logging(config.name, args.log_level)
    import asyncio

    try:
        asyncio.run(_serve(config))
    except AgentError as exc:
        return _fail(str(exc))
    return EXIT_OK


def _label(text: str) -> tuple[str, str]:
    from agent.domain.errors import ConfigError

    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError("labels must look like KEY=VALUE")
    return key, value


async def _serve(config: AgentConfig) -> None:
    import asyncio
    import signal

    from agent import app

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    from agent import testclock

    # None unless the fault suite's test-only clock variable is set.
    await app.run(config, stop=stop, clock=testclock.from_env())


def _setup_logging(agent: str, level: str) -> None:
    import logging

    from agent.logfmt import AgentField, KeyValueFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    handler.addFilter(AgentField(agent))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _fail(message: str) -> int:
    print(f"jitmesh-agent: {message}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
