"""What every jitctl command shares: the global options, the argument types, the output, the
connection, and the `command()` decorator that ties them to an async handler.

Adding a command (see also COORD.md / docs): in the module of its group (`requests.py`, ...)

    @command(group, "show", help="show one request", examples=["jitctl request show req-..."])
    @click.argument("id", metavar="ID")
    async def _show(client: Client, out: Output, *, id: str) -> None:
        request = await client.get_request(id)
        out.emit(output.request_json(request), output.request_details(request, out.now))

The handler gets a connected `Client`, the `Output` and the command's parameters by name. It
prints through `out.emit(value, table)` (JSON/YAML from `value`, the table for people) and
raises `CommandFailed` for a failed outcome (exit 1) or `UsageError` for bad input found late
(exit 2); SDK errors get their own exit codes (main.py). Never print directly: `-o` decides the
format.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any, Final, TextIO

import click
from rich.console import Console

from jitmesh import errors, profiles, tls
from jitmesh.cli import output
from jitmesh.client import Client
from jitmesh.clock import Clock, SystemClock
from jitmesh.durations import DurationError, parse_duration

DEFAULT_COORDINATOR: Final = "127.0.0.1:7443"
ENV_COORDINATOR: Final = "JITMESH_COORDINATOR"
ENV_TOKEN: Final = "JITMESH_TOKEN"  # noqa: S105 (the name of a variable, not a secret)
ENV_CA_FILE: Final = tls.ENV_CA_FILE
ENV_INSECURE: Final = tls.ENV_INSECURE
DEFAULT_TIMEOUT: Final = timedelta(seconds=10)
FORMATS: Final = ("table", "json", "yaml")


class CommandFailed(Exception):
    """The command ran but its outcome is a failure (exit 1); the message is the one line."""


class PolicyDenies(CommandFailed):
    """The policy's answer is deny (`policy test`): exit 5, as a refused request."""


class UsageError(Exception):
    """Bad input found after argument parsing (exit 2)."""


# ---------------------------------------------------------------------------------------------
# Settings: the global options, wherever on the command line they were given.


@dataclass
class Settings:
    """Global options as given on the command line (None: not given). A later occurrence wins,
    so `jitctl -o json agent list -o yaml` prints YAML: each level's options are parsed after
    its parent's."""

    coordinator: str | None = None
    token: str | None = None
    ca_file: str | None = None
    insecure: bool | None = None
    profile: str | None = None
    output: str | None = None
    timeout: timedelta | None = None
    clock: Clock = field(default_factory=SystemClock)

    def connection(self) -> profiles.Connection:
        """Flags, then JITMESH_* variables, then the profile (~/.config/jitmesh/config.toml)."""
        return profiles.resolve(
            coordinator=self.coordinator,
            token=self.token,
            ca_file=self.ca_file,
            insecure=self.insecure,
            profile=self.profile,
        )

    def resolved_coordinator(self) -> str:
        return self.connection().coordinator or DEFAULT_COORDINATOR

    def resolved_token(self) -> str | None:
        """The token to send; the one `jitctl login` saved when nothing else gives one."""
        try:
            return self.connection().token
        except errors.JitmeshError:
            return self.token or os.environ.get(ENV_TOKEN) or profiles.saved_token()


# Where `jitctl login` keeps its token: one definition, the SDK's (Client.from_config reads it).
token_file = profiles.token_file


def login_token_file(config: Settings) -> Path:
    """Where `jitctl login` keeps the token it gets: the active profile's token_file (the file
    later commands with that profile read), else `token_file()` (read when no flag, variable
    or profile gives a token)."""
    try:
        chosen = profiles.load_profile(config.profile)
    except errors.InvalidArgumentError as exc:
        raise UsageError(str(exc)) from None
    if chosen is not None and chosen.token_file is not None:
        return chosen.token_file
    return token_file()


def write_secret(path: Path, text: str) -> None:
    """Replace `path` with `text`, readable by its owner only (0600, directory made 0700): the
    new file is written beside it and renamed over it, so a crash leaves the old one whole and
    no reader ever sees a partly written or wider-permissioned file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def settings(ctx: click.Context | None = None) -> Settings:
    ctx = ctx or click.get_current_context()
    found = ctx.find_object(Settings)
    if found is None:  # a command run on its own (tests of one command): defaults
        found = ctx.ensure_object(Settings)
    return found


# ---------------------------------------------------------------------------------------------
# Argument types: each turns text into a value or says, in one line, what is wrong.


class DurationType(click.ParamType[timedelta]):
    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except DurationError as exc:
            self.fail(str(exc), param, ctx)


class CountType(click.ParamType[int]):
    """A whole number with a lower bound, and our own wording of the error."""

    def __init__(self, minimum: int) -> None:
        self.minimum = minimum
        self.name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            number = value
        else:
            try:
                number = int(str(value))
            except ValueError:
                number = self.minimum - 1
        if number < self.minimum:
            if self.minimum == 1:
                self.fail("must be a positive whole number", param, ctx)
            self.fail(f"must be a whole number, {self.minimum} or more", param, ctx)
        return number


class StateType(click.Choice[str]):
    """An enum state by its name, any case (`--state pending`), completed by the shell."""

    def __init__(self, enum: type[Enum]) -> None:
        super().__init__([m.value.lower() for m in enum], case_sensitive=False)
        self.enum = enum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, self.enum):
            return value
        try:
            return self.enum(str(value).upper())
        except ValueError:
            names = ", ".join(str(c) for c in self.choices)
            self.fail(f"state must be one of {names}", param, ctx)


class LabelType(click.ParamType[tuple[str, str]]):
    name = "KEY=VALUE"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, str]:
        if isinstance(value, tuple):
            return (str(value[0]), str(value[1]))
        key, sep, text = str(value).partition("=")
        if not sep or not key:
            self.fail("labels look like KEY=VALUE", param, ctx)
        return key, text


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


class SinceType(click.ParamType[Since]):
    name = "time"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Since:
        if isinstance(value, Since):
            return value
        text = str(value)
        try:
            return Since(ago=parse_duration(text))
        except DurationError:
            pass
        try:
            at = datetime.fromisoformat(text.strip())
        except ValueError:
            self.fail(
                "time must be RFC 3339 (2026-01-01T12:00:00Z) or a duration ago (1h)", param, ctx
            )
        if at.tzinfo is None:
            self.fail("time needs a timezone, such as Z or +02:00", param, ctx)
        return Since(at=at.astimezone(UTC))


DURATION: Final = DurationType()
POSITIVE: Final = CountType(1)
NON_NEGATIVE: Final = CountType(0)
LABEL: Final = LabelType()
SINCE: Final = SinceType()


# ---------------------------------------------------------------------------------------------
# Global options: accepted on every group and command, before or after the subcommand.


def _store(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None:
            setattr(settings(ctx), name, value)

    return callback


def _store_flag(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    # A flag not given stays None, so the environment decides (jitmesh.tls); given, it wins.
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value:
            setattr(settings(ctx), name, True)

    return callback


def global_options(*, visible: bool) -> Callable[[Any], Any]:
    """The connection and output options. Shown in full on `jitctl --help`; on each command only
    -o is shown (the others still work there, as the epilog says)."""
    hidden = not visible
    options = [
        click.option(
            "--profile",
            metavar="NAME",
            expose_value=False,
            callback=_store("profile"),
            hidden=hidden,
            help="Connection profile in ~/.config/jitmesh/config.toml (default: $JITMESH_PROFILE, "
            "else the file's default_profile); flags and JITMESH_* variables beat it.",
        ),
        click.option(
            "--coordinator",
            metavar="HOST:PORT",
            expose_value=False,
            callback=_store("coordinator"),
            hidden=hidden,
            help=f"Coordinator address (default: ${ENV_COORDINATOR} or {DEFAULT_COORDINATOR}).",
        ),
        click.option(
            "--token",
            metavar="TOKEN",
            expose_value=False,
            callback=_store("token"),
            hidden=hidden,
            help=f"Bearer token (default: ${ENV_TOKEN}); prefer the variable, argv is visible.",
        ),
        click.option(
            "--ca-file",
            metavar="PEM",
            expose_value=False,
            callback=_store("ca_file"),
            hidden=hidden,
            help=f"CA certificate of the coordinator (default: ${ENV_CA_FILE}; without one: the "
            "system's trust store).",
        ),
        click.option(
            "--insecure",
            is_flag=True,
            default=None,
            expose_value=False,
            callback=_store_flag("insecure"),
            hidden=hidden,
            help=f"Plain text, for a development coordinator on loopback (default: "
            f"${ENV_INSECURE}); the token is readable on the network.",
        ),
        click.option(
            "-o",
            "--output",
            type=click.Choice(FORMATS),
            expose_value=False,
            callback=_store("output"),
            help="Output format: table (default), json or yaml.",
        ),
        click.option(
            "--timeout",
            type=DURATION,
            metavar="DURATION",
            expose_value=False,
            callback=_store("timeout"),
            hidden=hidden,
            help="Deadline of each call to the coordinator (default: 10s).",
        ),
    ]

    def decorate(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


GLOBAL_NOTE: Final = (
    "Global options (--profile, --coordinator, --token, --ca-file, --insecure, -o, --timeout) "
    "work before or after any command; see 'jitctl --help'."
)


# ---------------------------------------------------------------------------------------------
# Groups and commands


def _epilog(examples: Sequence[str]) -> str:
    # \b keeps click from re-wrapping the example lines.
    lines = "\n".join(f"  {e}" for e in examples)
    return f"\b\nExamples:\n{lines}\n\n{GLOBAL_NOTE}"


class Group(click.Group):
    """A command group: its commands listed in the order they were added; with no command it
    shows its help (exit 0)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


def _show_help_without_command(ctx: click.Context) -> None:
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help(), color=ctx.color)
        ctx.exit(0)


def group(
    parent: click.Group | None, name: str, *, help: str, examples: Sequence[str]
) -> click.Group:
    """A noun (`request`, `grant`, ...) under `parent`, carrying the global options."""

    @global_options(visible=False)
    def callback() -> None:
        _show_help_without_command(click.get_current_context())

    made = Group(
        name,
        callback=callback,
        params=getattr(callback, "__click_params__", []),
        help=help,
        short_help=help,
        epilog=_epilog(examples),
        invoke_without_command=True,
        no_args_is_help=False,
        subcommand_metavar="COMMAND [ARGS]...",
    )
    if parent is not None:
        parent.add_command(made)
    return made


Handler = Callable[..., Awaitable[None]]


def command(
    parent: click.Group | None,
    name: str,
    *,
    help: str,
    examples: Sequence[str],
    connect: bool = True,
) -> Callable[[Handler], click.Command]:
    """Turn `async def handler(client, out, **params)` into a command of `parent` (None: a
    top-level command, added to GROUPS in main.py).

    With connect=False the handler gets None for the client (commands that work offline)."""

    def decorate(handler: Handler) -> click.Command:
        @functools.wraps(handler)
        def callback(**params: Any) -> None:
            ctx = click.get_current_context()
            asyncio.run(_invoke(settings(ctx), handler, params, connect=connect))

        # Parameters declared with @click.option / @click.argument under @command() are on
        # the handler; the global options go after them.
        params = list(reversed(getattr(handler, "__click_params__", [])))
        made = click.Command(
            name,
            callback=callback,
            params=params,
            help=help,
            short_help=help,
            epilog=_epilog(examples),
        )
        global_options(visible=False)(made)
        if parent is not None:
            parent.add_command(made)
        return made

    return decorate


async def _invoke(
    config: Settings, handler: Handler, params: dict[str, Any], *, connect: bool
) -> None:
    out = Output(config.output or "table", config.clock, sys.stdout)
    if not connect:
        await handler(None, out, **params)
        return
    try:
        # TLS unless told otherwise: the SDK applies $JITMESH_CA_FILE and $JITMESH_INSECURE
        # (jitmesh.tls), and a flag given here beats them; the profile comes last.
        found = config.connection()
        client = await Client.connect(
            found.coordinator or DEFAULT_COORDINATOR,
            token=found.token,
            ca_file=found.ca_file,
            insecure=found.insecure,
            timeout=(config.timeout or DEFAULT_TIMEOUT).total_seconds(),
        )
    except errors.InvalidArgumentError as exc:
        raise UsageError(str(exc)) from None
    async with client:
        await handler(client, out, **params)


# ---------------------------------------------------------------------------------------------
# Output


class Output:
    """Where a command's result goes, in the format asked for, and the time it is shown at.

    Tables get coloured states only when stdout is a terminal (rich decides, and honours
    NO_COLOR); piped output is plain text, byte for byte what the tests read."""

    def __init__(self, fmt: str, clock: Clock, stream: TextIO) -> None:
        self.format = fmt
        self._clock = clock
        self._stream = stream
        self._console = Console(file=stream, highlight=False, markup=False, soft_wrap=True)

    @property
    def json(self) -> bool:
        return self.format == "json"

    @property
    def structured(self) -> bool:
        """JSON or YAML: a program reads this."""
        return self.format != "table"

    @property
    def now(self) -> datetime:
        # Read when used: `request create --wait` may print minutes after it started.
        return self._clock.now()

    def emit(self, value: output.JSON | list[output.JSON], text: str | output.Table) -> None:
        if self.format == "json":
            self.line(output.dumps(value))
        elif self.format == "yaml":
            self.write(output.dumps_yaml(value))
        else:
            self.show(text)

    def record(self, value: output.JSON, text: str | output.Table) -> None:
        """One item of a stream: a JSON line, a YAML document, or a table row."""
        if self.format == "json":
            self.line(output.dumps_line(value))
        elif self.format == "yaml":
            self.write("---\n" + output.dumps_yaml(value))
        else:
            self.show(text)

    def show(self, text: str | output.Table) -> None:
        if isinstance(text, output.Table) and self._console.is_terminal:
            self._console.print(text.rich())
        else:
            self.line(str(text))

    def line(self, text: str) -> None:
        print(text, file=self._stream, flush=True)

    def write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()

    @contextmanager
    def waiting(self, message: str) -> Iterator[Callable[[str], None]]:
        """A live spinner on stderr while something happens elsewhere (only on a terminal:
        scripts see nothing). Yields a function that changes the message."""
        console = Console(stderr=True, highlight=False, markup=False)
        if not console.is_terminal:
            yield lambda _message: None
            return
        with console.status(message) as status:
            yield lambda text: status.update(text)
