"""`jitmesh-agent`: run the agent, or answer a local access check from its lease table.

    jitmesh-agent [run] --coordinator ADDR --name NAME --join-token TOKEN --state DIR
                        [--label KEY=VALUE ...] [--enforcer KIND:WHERE ...]
    jitmesh-agent check --state DIR [--subject USER | --pam] --action ACTION
    jitmesh-agent exec --state DIR [--subject USER] --action ACTION [--release]
                       [--request --duration 15m --reason TEXT] -- COMMAND ...
    jitmesh-agent breakglass --state DIR CODE

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
    from agent import settings as agent_settings
    from agent.config import AgentConfig
    from agent.domain.steps import StepHook
    from jitmesh.clock import Clock

EXIT_OK = 0
EXIT_DENIED = 1
EXIT_USAGE = 2


def main(
    argv: Sequence[str] | None = None,
    *,
    clock: Clock | None = None,
    step: StepHook | None = None,
) -> int:
    """The command line. `clock` and `step` reach `agent.app.run` (the fault suite's launcher,
    tests/support/faulty_agent.py, passes a movable clock and a crash point there); no flag or
    environment variable sets them."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["check"]:
        return check(args[1:])
    if args[:1] == ["exec"]:
        return exec_command(args[1:])
    if args[:1] == ["breakglass"]:
        return breakglass(args[1:])
    if args[:1] == ["run"]:
        args = args[1:]
    return run(args, clock=clock, step=step)


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
    if parsed.request or parsed.release:
        # These reach the coordinator through the SDK: gRPC's core prints nothing of its own
        # (the SDK's error carries its reason), as in jitctl (jitmesh/grpclog.py).
        from jitmesh import grpclog

        grpclog.quiet("NONE")
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


def breakglass(argv: Sequence[str]) -> int:
    parser = _OneLineParser(
        prog="jitmesh-agent breakglass",
        description="Present a break-glass code to the agent (over its socket, as yourself): "
        "with a valid code the agent grants its access at once, without the coordinator.",
    )
    parser.add_argument("--state", required=True, type=Path, help="the agent's state directory")
    parser.add_argument("code", help="the code as issued (base64url)")
    args = parser.parse_args(argv)
    from agent.local.client import Unreachable, ask

    try:
        answer = ask(args.state, {"method": "breakglass", "code": args.code})
    except Unreachable as exc:
        return _fail(f"breakglass: {exc}")
    if not answer.get("ok"):
        print(f"jitmesh-agent breakglass: {answer.get('error', 'refused')}", file=sys.stderr)
        return EXIT_DENIED
    shown = {k: v for k, v in answer.items() if k != "ok" and isinstance(v, str | int)}
    print(" ".join(f"{key}={value}" for key, value in sorted(shown.items())) or "granted")
    return EXIT_OK


def _iso_ms(ms: int) -> str:
    from datetime import UTC, datetime, timedelta

    at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    return at.isoformat(timespec="seconds").replace("+00:00", "Z")


# run


def run(argv: Sequence[str], *, clock: Clock | None = None, step: StepHook | None = None) -> int:
    from agent import settings as agent_settings
    from jitmesh import grpclog

    # First, before anything imports grpc (checking the CA file does): gRPC's own lines become
    # the agent's log records (jitmesh/grpclog.py).
    grpclog.capture()
    parser = argparse.ArgumentParser(
        prog="jitmesh-agent",
        description="Run the jitmesh agent (see also: jitmesh-agent check --help).",
        epilog="Every setting can also come from the TOML file given with --config (key "
        "log_level) or from the environment (JITMESH_LOG_LEVEL); flags win over the "
        "environment, which wins over the file. Durations are written as 10s, 5m or 1h.",
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings as TOML (secrets masked) and exit",
    )
    for setting in agent_settings.SETTINGS:
        if setting.name in ("labels", "enforcer"):
            continue
        if setting.name == "insecure":
            parser.add_argument(
                "--insecure",
                dest="insecure",
                action="store_const",
                const=True,
                default=argparse.SUPPRESS,
                help="plain text, for a development or --insecure coordinator (env "
                "JITMESH_INSECURE=1); one of --ca-file and --insecure is needed",
            )
            continue
        parser.add_argument(
            setting.flag,
            dest=setting.name,
            default=argparse.SUPPRESS,
            metavar=setting.name.split("_")[-1].upper(),
            help=setting.help,
        )
    parser.add_argument(
        "--label",
        dest="labels",
        action="append",
        default=argparse.SUPPRESS,
        metavar="KEY=VALUE",
        help="repeatable; asked for at enrollment, which the coordinator refuses unless the join "
        "token gives the same label (the agent gets the token's labels)",
    )
    parser.add_argument(
        "--enforcer",
        action="append",
        default=argparse.SUPPRESS,
        metavar="file:DIR|exec:FILE|sudo:TOML|group:TOML|ssh:TOML",
        help="repeatable; applied in the order given. file,drift=report:DIR (or exec,...) "
        "only reports access on the host no lease holds instead of removing it",
    )
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k in agent_settings.BY_NAME and v is not None}

    from agent.domain.errors import AgentError

    try:
        loaded = agent_settings.load(args.config, flags)
        if args.print_config:
            import tomli_w

            sys.stdout.write(tomli_w.dumps(agent_settings.printable(loaded)))
            return EXIT_OK
        config = _agent_config(loaded)
    except AgentError as exc:
        return _fail(f"configuration: {exc}")

    from jitmesh import logs

    try:
        logs.setup(
            loaded.values["log_level"],
            loaded.values["log_format"],
            static={"agent": config.name},
            target=loaded.values["log_target"],
            syslog_address=loaded.values["syslog_address"],
            ident="jitmesh-agent",
        )
    except logs.LogTargetError as exc:
        return _fail(f"configuration: {exc}")
    import asyncio

    try:
        asyncio.run(_serve(config, loaded, clock=clock, step=step))
    except AgentError as exc:
        return _fail(str(exc))
    return EXIT_OK


def _agent_config(loaded: agent_settings.Loaded) -> AgentConfig:
    from agent.config import AgentConfig, EnforcerConfig, enforcers_from_tables, parse_enforcer
    from agent.domain.errors import ConfigError

    values = loaded.values
    for required in ("coordinator", "name", "state"):
        if not values.get(required):
            flag = "--" + required
            raise ConfigError(
                f"{flag} (or JITMESH_{required.upper()}, or {required} in --config) is required"
            )
    enforcers: list[EnforcerConfig] = []
    for number, text in enumerate(values["enforcer"], 1):
        try:
            enforcers.append(parse_enforcer(text))
        except ConfigError as exc:
            raise ConfigError(f"--enforcer number {number}: {exc}") from None
    enforcers += enforcers_from_tables(loaded.enforcer_tables, loaded.config_file)
    from agent import settings as agent_settings

    ca_file, insecure = agent_settings.transport(loaded)

    return AgentConfig(
        coordinator=values["coordinator"],
        name=values["name"],
        labels=values["labels"],
        join_token=agent_settings.join_token(loaded),
        ca_file=ca_file,
        insecure=insecure,
        state_dir=Path(values["state"]),
        enforcers=tuple(enforcers),
        backoff_base=values["backoff_base"],
        backoff_cap=values["backoff_cap"],
        heartbeat=values["heartbeat"],
        keepalive_time=values["keepalive"],
        keepalive_timeout=values["keepalive_timeout"],
        remove_retries=values["remove_retries"],
        remove_retry_base=values["remove_retry_base"],
        skew_tolerance=values["skew_tolerance"],
        reconcile_every=values["reconcile_every"],
        lease_retention=values["lease_retention"],
        exec_grace=values["exec_grace"],
        breakglass_max=values["breakglass_max"],
        end_sessions=values["end_sessions"],
        metrics_listen=values.get("metrics_listen"),
    )


async def _serve(
    config: AgentConfig,
    loaded: agent_settings.Loaded,
    *,
    clock: Clock | None = None,
    step: StepHook | None = None,
) -> None:
    import asyncio
    import logging
    import signal

    from agent import app
    from agent import settings as agent_settings
    from agent.domain.errors import AgentError
    from jitmesh import logs, sdnotify

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stopping() -> None:
        sdnotify.stopping("shutting down")
        stop.set()

    def reload() -> None:
        # SIGHUP: what can change live (the log level); the rest needs a restart.
        sdnotify.reloading()
        log = logging.getLogger("agent")
        try:
            fresh = agent_settings.load(loaded.config_file, loaded.flags)
        except AgentError as exc:
            log.error("configuration not reloaded", extra={"error": str(exc)})
        else:
            logs.set_level(fresh.values["log_level"])
            log.info("configuration reloaded", extra={"log_level": fresh.values["log_level"]})
        sdnotify.ready()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping)
    loop.add_signal_handler(signal.SIGHUP, reload)
    from agent.domain.steps import no_hook

    await app.run(config, stop=stop, clock=clock, step=step or no_hook)


def _fail(message: str) -> int:
    print(f"jitmesh-agent: {message}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
