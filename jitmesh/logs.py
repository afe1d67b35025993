"""Operational logs for the daemons: one line per event, JSON or console key=value, with the
keys of `jitmesh.telemetry` first and every other key a caller passed after them.

Only entry points call `setup()`. The audit log is separate (it lives in the coordinator's
store); these lines are for operators. Standard library only: the agent imports this and keeps
its memory budget.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Final, TextIO

from jitmesh import telemetry
from jitmesh.clock import rfc3339

FORMATS: Final = ("json", "console")
TARGETS: Final = ("stderr", "syslog")
# The local syslog daemon's socket (rsyslog, syslog-ng, journald all listen on it).
SYSLOG_ADDRESS: Final = "/dev/log"
LEVELS: Final = ("debug", "info", "warning", "error")

# What every LogRecord has: not extras.
_RECORD_ATTRS: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
_HEAD: Final = telemetry.LEADING_KEYS[4:]  # after ts, level, logger, msg


# Functions giving fields of the moment to every line, called as the line is formatted (in the
# caller's thread and context): the trace id of the active span when tracing is on
# (server/tracing.py). A caller's own `extra` wins over them.
_CONTEXT: list[Callable[[], Mapping[str, object]]] = []


def add_context(provider: Callable[[], Mapping[str, object]]) -> None:
    """Add `provider`'s fields to every line from now on (once per provider)."""
    if provider not in _CONTEXT:
        _CONTEXT.append(provider)


def remove_context(provider: Callable[[], Mapping[str, object]]) -> None:
    if provider in _CONTEXT:
        _CONTEXT.remove(provider)


class LogLevelError(ValueError):
    """A log level that is not one of LEVELS."""


def parse_level(text: str) -> int:
    """debug, info, warning or error, any case, to the logging module's number."""
    name = text.strip().lower()
    if name not in LEVELS:
        raise LogLevelError(f"log level must be one of {', '.join(LEVELS)}")
    return int(getattr(logging, name.upper()))


def fields(record: logging.LogRecord, static: Mapping[str, object] = {}) -> dict[str, object]:
    """Every field of one line, in order: ts, level, logger, msg, the leading keys, then the
    rest alphabetically. Empty values (None, "") are left out; nothing else ever is."""
    at = rfc3339(datetime.fromtimestamp(record.created, UTC))
    out: dict[str, object] = {
        telemetry.TS: at.replace("+00:00", "Z"),
        telemetry.LEVEL: record.levelname.lower(),
        telemetry.LOGGER: record.name,
        telemetry.MSG: record.getMessage(),
    }
    extras = {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}
    for key, value in static.items():
        extras.setdefault(key, value)
    for provider in _CONTEXT:
        for key, value in provider().items():
            extras.setdefault(key, value)
    for key in _HEAD:
        value = extras.pop(key, None)
        if value is not None and value != "":
            out[key] = value
    for key in sorted(extras):
        value = extras[key]
        if value is not None and value != "" and not key.startswith("_"):
            out[key] = value
    if record.exc_info:
        out["exc"] = logging.Formatter().formatException(record.exc_info)
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line (what a log shipper or SIEM reads)."""

    def __init__(self, static: Mapping[str, object] | None = None) -> None:
        super().__init__()
        self._static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(fields(record, self._static), ensure_ascii=False, default=str)


class ConsoleFormatter(logging.Formatter):
    """`key=value` pairs, values quoted as JSON strings when they need it (no log injection)."""

    def __init__(self, static: Mapping[str, object] | None = None) -> None:
        super().__init__()
        self._static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_quote(v)}" for k, v in fields(record, self._static).items())


def _quote(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and all(c.isprintable() and c not in ' "=\\' for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


class LogTargetError(ValueError):
    """A log target that cannot be used (an unknown one, or a syslog socket that is not there);
    the message says which."""


def setup(
    level: str = "info",
    fmt: str = "console",
    *,
    static: Mapping[str, object] | None = None,
    stream: TextIO | None = None,
    target: str = "stderr",
    syslog_address: str = SYSLOG_ADDRESS,
    ident: str = "jitmesh",
) -> logging.Handler:
    """Send every logger's records to `stream` (stderr), or with `target="syslog"` to the
    syslog daemon at `syslog_address` (a unix socket path, or HOST:PORT over UDP) tagged
    `ident[pid]:`, in `fmt`, at `level`, with `static` fields (such as the agent's name) on
    every line. Returns the handler (tests read it)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    handler: logging.Handler
    if target == "syslog":
        handler = syslog_handler(syslog_address, ident)
    elif target == "stderr":
        handler = logging.StreamHandler(stream or sys.stderr)
    else:
        raise LogTargetError(f"log target must be one of {', '.join(TARGETS)}")
    formatter = JsonFormatter(static) if fmt == "json" else ConsoleFormatter(static)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(parse_level(level))
    # Libraries' chatter (every SQL statement, gRPC internals) stays out of operators' logs,
    # even at debug: our own debug lines are what an operator asked for.
    for noisy in ("yoyo", "aiosqlite", "grpc", "asyncio", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler


def syslog_handler(address: str, ident: str) -> logging.Handler:
    """The standard library's SysLogHandler: one datagram per line, facility daemon, the
    priority from the line's level, no trailing NUL (rsyslog and journald show it as #000)."""
    # Imported here: the agent's memory budget has no room for what it does not use.
    import os
    from logging.handlers import SysLogHandler

    where: str | tuple[str, int] = address
    if not address.startswith("/"):
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise LogTargetError("syslog address must be a socket path or HOST:PORT (UDP)")
        where = (host.strip("[]"), int(port))
    # Like openlog(3), a daemon not listening yet is not an error: the handler connects again
    # at each line until it is.
    try:
        handler = SysLogHandler(where, facility=SysLogHandler.LOG_DAEMON)
    except OSError as exc:  # a UDP address that does not resolve
        raise LogTargetError(f"cannot use syslog at {address}: {exc.strerror}") from None
    handler.append_nul = False
    handler.ident = f"{ident}[{os.getpid()}]: "
    return handler


def set_level(level: str) -> None:
    """Change the level of a running process (SIGHUP reload)."""
    logging.getLogger().setLevel(parse_level(level))
