"""jitctl: the operator CLI. The root command, the groups, and the one place that turns every
failure into an exit code and one line on stderr.

Exit codes: 0 success; 1 the coordinator refused or failed, or the awaited outcome did not
happen (denied, expired, broken audit chain, ...); 2 bad usage; 130 interrupted. Every failure is
one line on stderr, `jitctl: <reason>`, never a traceback and never the token.

The commands live one module per group (requests.py, grants.py, agents.py, locks.py, tokens.py,
policy.py, audit.py, completion.py); the shared machinery is in core.py, the formatting in
output.py. To add a group, write its module and add it to GROUPS below.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib import metadata

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

Run 'jitctl COMMAND --help' for a command's options and examples.""",
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


def _fail(message: str, code: int) -> int:
    # Reasons can carry coordinator text (a deny reason, an agent's failure): keep it one line.
    print(f"jitctl: {output.cell(message)}", file=sys.stderr, flush=True)
    return code


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
        return _fail(usage_line(exc), 2)
    except click.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code)
    except errors.AuthenticationError as exc:
        hint = "" if config.resolved_token() else f" (no token given: use --token or ${ENV_TOKEN})"
        return _fail(f"{exc}{hint}", 1)
    except (errors.JitmeshError, CommandFailed) as exc:
        return _fail(str(exc), 1)
    except UsageError as exc:
        return _fail(str(exc), 2)
    except (KeyboardInterrupt, click.Abort):
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
        token = config.resolved_token()
        if token:
            message = message.replace(token, "[redacted]")
        return _fail(f"unexpected error ({type(exc).__name__}): {message}", 1)


if __name__ == "__main__":
    sys.exit(main())
