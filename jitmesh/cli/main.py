"""jitctl: the operator CLI. The root command, the groups, and the one place that turns every
failure into an exit code and one line on stderr.

Exit codes, one per kind of failure (EXIT_CODES; docs/cli.md, "Errors and exit codes"): 0
success; 1 failed (the coordinator refused for another reason, or the awaited outcome did not
happen: denied by a reviewer, expired, broken audit chain, ...); 2 usage (bad input, refused
before anything changed); 3 not found; 4 permission (no, bad or insufficient credential); 5
policy denied; 6 unavailable; 7 timed out; 130 interrupted. Every failure is one line on stderr,
`jitctl: <reason>`, never a traceback and never the token; with `-o json` that line is a JSON
object instead (`{"error": {...}}`), for programs.

The commands live one module per group (requests.py, grants.py, agents.py, locks.py, tokens.py,
policy.py, audit.py, completion.py); the shared machinery is in core.py, the formatting in
output.py. To add a group, write its module and add it to GROUPS below.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Final

import click

from jitmesh import errors
from jitmesh.cli import output
from jitmesh.cli.agents import agents
from jitmesh.cli.audit import audit
from jitmesh.cli.breakglass import breakglass
from jitmesh.cli.completion import COMPLETE_VAR, completion
from jitmesh.cli.core import (
    ENV_TOKEN,
    CommandFailed,
    Group,
    PolicyDenies,
    Settings,
    UsageError,
    global_options,
)
from jitmesh.cli.grants import grants
from jitmesh.cli.locks import locks
from jitmesh.cli.login import register as register_login
from jitmesh.cli.notify import notify
from jitmesh.cli.policy import policy
from jitmesh.cli.requests import requests
from jitmesh.cli.status import status
from jitmesh.cli.tokens import certs, tokens, users
from jitmesh.clock import Clock

# The order `jitctl --help` lists them in.
GROUPS: tuple[click.Command, ...] = (
    status,
    requests,
    grants,
    agents,
    locks,
    breakglass,
    notify,
    policy,
    audit,
    tokens,
    certs,
    users,
    completion,
)


def _version() -> str:
    try:
        return metadata.version("jitmesh")
    except metadata.PackageNotFoundError:
        return "unknown"


@click.group(
    "jitctl",
    cls=Group,
    invoke_without_command=True,
    subcommand_metavar="COMMAND [ARGS]...",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="""\b
Examples:
  export JITMESH_COORDINATOR=coordinator.example:7443 JITMESH_TOKEN=...
  jitctl request create --agent web-1 --action deploy --duration 15m --reason INC-42 --wait
  jitctl grant list -o json
  jitctl agent list

Run 'jitctl COMMAND --help' for a command's options and examples.
Exit codes: 0 ok, 1 failed, 2 usage, 3 not found, 4 permission, 5 policy denied,
6 unavailable, 7 timed out (docs/cli.md, "Errors and exit codes").""",
)
@global_options(visible=True)
@click.version_option(_version(), "--version", prog_name="jitctl", message="%(prog)s %(version)s")
def cli() -> None:
    """Operate a jitmesh coordinator: requests, grants, agents, policy, audit."""
    ctx = click.get_current_context()
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help(), color=ctx.color)
        ctx.exit(0)


for _command in GROUPS:
    cli.add_command(_command)
register_login(cli)  # jitctl login, jitctl whoami
# Every context (and so every level's help) inherits the root's settings.
for _command in cli.commands.values():
    _command.context_settings = {**cli.context_settings, **_command.context_settings}


@dataclass(frozen=True)
class Exit:
    code: int
    kind: str
    meaning: str


OK: Final = Exit(0, "ok", "success")
FAILED: Final = Exit(
    1,
    "failed",
    "the coordinator refused for another reason (conflict, rate limit, internal), or the "
    "awaited outcome did not happen (denied by a reviewer, expired, broken audit chain)",
)
USAGE: Final = Exit(2, "usage", "bad usage or input; nothing was changed")
NOT_FOUND: Final = Exit(3, "not_found", "no such request, grant, agent, ... (or not yours to see)")
PERMISSION: Final = Exit(4, "permission", "no, bad or insufficient credential")
POLICY_DENIED: Final = Exit(5, "policy_denied", "the policy denies it (also `policy test`)")
UNAVAILABLE: Final = Exit(6, "unavailable", "the coordinator cannot be reached (or TLS failed)")
TIMED_OUT: Final = Exit(7, "timed_out", "the coordinator did not answer in time, or --wait gave up")
INTERRUPTED: Final = Exit(130, "interrupted", "interrupted (Ctrl-C)")
EXITS: Final = (OK, FAILED, USAGE, NOT_FOUND, PERMISSION, POLICY_DENIED, UNAVAILABLE, TIMED_OUT)

# The SDK's error classes to exit codes: the most specific class listed wins.
EXIT_CODES: Final[dict[type[Exception], Exit]] = {
    errors.JitmeshError: FAILED,
    errors.InvalidArgumentError: USAGE,
    errors.NotFoundError: NOT_FOUND,
    errors.AuthenticationError: PERMISSION,
    errors.PermissionDeniedError: PERMISSION,
    errors.PolicyDeniedError: POLICY_DENIED,
    errors.UnavailableError: UNAVAILABLE,
    errors.DeadlineExceededError: TIMED_OUT,
    CommandFailed: FAILED,
    PolicyDenies: POLICY_DENIED,
    UsageError: USAGE,
    click.UsageError: USAGE,
}


def exit_of(exc: Exception) -> Exit:
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return FAILED


def _fail(message: str, exit: Exit, *, as_json: bool, exc: Exception | None = None) -> int:
    # Reasons can carry coordinator text (a deny reason, an agent's failure): keep it one line.
    text = output.cell(message)
    if as_json:
        error: dict[str, object] = {"kind": exit.kind, "exit_code": exit.code, "message": text}
        if isinstance(exc, errors.JitmeshError):
            error["code"] = exc.code
            error["reason"] = exc.reason or None
        print(output.dumps_line({"error": error}), file=sys.stderr, flush=True)
    else:
        print(f"jitctl: {text}", file=sys.stderr, flush=True)
    return exit.code


def _wants_json(config: Settings, args: Sequence[str]) -> bool:
    """-o json, also when parsing stopped before the option was read (a usage error)."""
    if config.output is not None:
        return config.output == "json"
    wanted = None
    for i, arg in enumerate(args):
        if arg in ("-o", "--output") and i + 1 < len(args):
            wanted = args[i + 1]
        elif arg.startswith("--output="):
            wanted = arg.partition("=")[2]
        elif arg.startswith("-o") and len(arg) > 2 and not arg.startswith("--"):
            wanted = arg[2:]
    return wanted == "json"


def usage_line(exc: click.UsageError) -> str:
    """Click's usage errors in our one-line form: what is wrong, then where help is."""
    if isinstance(exc, click.NoSuchOption):
        message = f"no such option {exc.option_name}"
        if exc.possibilities:
            message += f" (did you mean {', '.join(sorted(exc.possibilities))}?)"
    elif isinstance(exc, click.MissingParameter) and exc.param is not None:
        name = exc.param.opts[0] if isinstance(exc.param, click.Option) else exc.param.name
        kind = "option" if isinstance(exc.param, click.Option) else "argument"
        message = f"missing {kind} {(name or '').upper() if kind == 'argument' else name}"
    elif isinstance(exc, click.BadParameter) and exc.param is not None:
        param = exc.param
        name = "/".join(param.opts) if isinstance(param, click.Option) else param.name
        message = f"argument {name}: {exc.message}"
    else:
        message = exc.format_message()
        message = message[:1].lower() + message[1:]
    message = message.rstrip(".")
    if exc.ctx is not None:
        message += f" (see '{exc.ctx.command_path} --help')"
    return message


def main(argv: Sequence[str] | None = None, *, clock: Clock | None = None) -> int:
    """Run jitctl with `argv` (default: the process arguments) and return the exit code."""
    config = Settings() if clock is None else Settings(clock=clock)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = cli.main(
            args=args,
            prog_name="jitctl",
            complete_var=COMPLETE_VAR,
            standalone_mode=False,
            obj=config,
        )
        return code if isinstance(code, int) else 0
    except click.UsageError as exc:
        return _fail(usage_line(exc), USAGE, as_json=_wants_json(config, args), exc=exc)
    except click.ClickException as exc:
        return _fail(
            exc.format_message(),
            Exit(exc.exit_code, FAILED.kind, FAILED.meaning),
            as_json=_wants_json(config, args),
            exc=exc,
        )
    except errors.AuthenticationError as exc:
        hint = "" if config.resolved_token() else f" (no token given: use --token or ${ENV_TOKEN})"
        return _fail(f"{exc}{hint}", exit_of(exc), as_json=_wants_json(config, args), exc=exc)
    except (errors.JitmeshError, CommandFailed, UsageError) as exc:
        return _fail(str(exc), exit_of(exc), as_json=_wants_json(config, args), exc=exc)
    except (KeyboardInterrupt, click.Abort):
        return INTERRUPTED.code
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
        token = config.resolved_token()
        if token:
            message = message.replace(token, "[redacted]")
        return _fail(
            f"unexpected error ({type(exc).__name__}): {message}",
            FAILED,
            as_json=_wants_json(config, args),
        )


if __name__ == "__main__":
    sys.exit(main())
