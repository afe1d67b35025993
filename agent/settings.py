"""The agent's settings: one TOML file (`--config`), then `JITMESH_*` environment variables,
then flags, each overriding the one before; the same rules and spellings as the coordinator's
(`log_level` / `JITMESH_LOG_LEVEL` / `--log-level`), durations as `10s` or `5m`.

Light on purpose (no pydantic-settings here, see agent/config.py): a table of settings and
tomllib from the standard library; the result is validated once more by `AgentConfig`.

Enforcers come from `enforcer = ["file:DIR", "exec:FILE", ...]` (the flag's syntax) and from
`[enforcers.KIND]` tables: `[enforcers.file] directory = "..."`, `[enforcers.exec] hooks =
"FILE"`, and the host enforcers' own sections (`[enforcers.sudo]`, ...) in the format their
modules define.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

from agent import defaults
from agent.domain.errors import ConfigError
from jitmesh.durations import DurationError, format_duration, parse_duration

ENV_PREFIX: Final = "JITMESH_"
_SECONDS: Final = re.compile(r"\d+(\.\d+)?")
MASK: Final = "********"


def _text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name}: must be a string")
    return value


def _seconds(value: object, name: str) -> float:
    """A duration (`10s`, `5m`); a bare number is seconds, as the flags took before."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = _text(value, name).strip()
    if _SECONDS.fullmatch(text):
        return float(text)
    try:
        return parse_duration(text).total_seconds()
    except DurationError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _int(value: object, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = _text(value, name).strip()
    if not text.isdigit():
        raise ConfigError(f"{name}: must be a whole number")
    return int(text)


def _labels(value: object, name: str) -> dict[str, str]:
    """A TOML table, or KEY=VALUE items (a list, or one comma-separated string)."""
    if isinstance(value, Mapping):
        return {str(k): _text(v, name) for k, v in value.items()}
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{name}: must be KEY=VALUE items")
    labels: dict[str, str] = {}
    for item in items:
        key, sep, text = _text(item, name).partition("=")
        if not sep or not key:
            raise ConfigError("labels must look like KEY=VALUE")
        labels[key.strip()] = text.strip()
    return labels


def _list(value: object, name: str) -> list[str]:
    if isinstance(value, str):
        return [part for part in value.split(",") if part]
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{name}: must be a list")
    return [_text(v, name) for v in value]


def _bool(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    from jitmesh import errors, tls

    try:
        return tls.parse_insecure(_text(value, name), source=name)
    except errors.JitmeshError as exc:
        raise ConfigError(str(exc)) from None


def _level(value: object, name: str) -> str:
    from jitmesh.logs import LogLevelError, parse_level

    text = _text(value, name)
    try:
        parse_level(text)
    except LogLevelError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return text.strip().lower()


def _format(value: object, name: str) -> str:
    text = _text(value, name)
    if text not in ("console", "json"):
        raise ConfigError(f"{name}: must be console or json")
    return text


def _target(value: object, name: str) -> str:
    text = _text(value, name)
    if text not in ("stderr", "syslog"):
        raise ConfigError(f"{name}: must be stderr or syslog")
    return text


def _end_sessions(value: object, name: str) -> str:
    text = _text(value, name)
    if text not in ("exec", "user"):
        raise ConfigError(f"{name}: must be exec or user")
    return text


def _listen(value: object, name: str) -> str:
    text = _text(value, name)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{name}: expected HOST:PORT, e.g. 127.0.0.1:9465")
    return text


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[object, str], Any]
    default: object = None
    secret: bool = False
    help: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SETTINGS: Final = (
    Setting("coordinator", _text, help="coordinator address HOST:PORT"),
    Setting("name", _text, help="this agent's name"),
    Setting("state", _text, help="state directory"),
    Setting("labels", _labels, {}, help="KEY=VALUE labels asked for at enrollment"),
    Setting("join_token", _text, secret=True, help="one-time join token (prefer the file)"),
    Setting("join_token_file", _text, help="file holding the one-time join token"),
    Setting("ca_file", _text, help="the coordinator's CA certificate, its DATA/ca/ca.pem (mTLS)"),
    Setting("insecure", _bool, help="plain text, for a development or --insecure coordinator"),
    Setting(
        "enforcer",
        _list,
        [],
        help="enforcers as file:DIR, exec:FILE or sudo:FILE.toml (repeatable)",
    ),
    Setting("log_level", _level, "info", help="debug, info, warning or error"),
    Setting("log_format", _format, "console", help="console or json"),
    Setting("log_target", _target, "stderr", help="where log lines go: stderr or syslog"),
    Setting(
        "syslog_address",
        _text,
        "/dev/log",
        help="with log_target syslog: the daemon's socket path, or HOST:PORT over UDP",
    ),
    Setting("metrics_listen", _listen, help="serve Prometheus metrics on HOST:PORT"),
    Setting("backoff_base", _seconds, defaults.BACKOFF_BASE, help="first reconnect delay"),
    Setting("backoff_cap", _seconds, defaults.BACKOFF_CAP, help="longest reconnect delay"),
    Setting(
        "heartbeat", _seconds, defaults.HEARTBEAT, help="heartbeat when the coordinator names none"
    ),
    Setting("keepalive", _seconds, defaults.KEEPALIVE, help="HTTP/2 keepalive interval"),
    Setting("keepalive_timeout", _seconds, defaults.KEEPALIVE_TIMEOUT, help="HTTP/2 ping timeout"),
    Setting(
        "remove_retries",
        _int,
        defaults.REMOVE_RETRIES,
        help="removal attempts before REVOKE_FAILED",
    ),
    Setting(
        "remove_retry_base",
        _seconds,
        defaults.REMOVE_RETRY_BASE,
        help="first delay between removal attempts",
    ),
    Setting(
        "skew_tolerance", _seconds, defaults.SKEW_TOLERANCE, help="refuse grants issued further off"
    ),
    Setting(
        "reconcile_every",
        _seconds,
        defaults.RECONCILE_EVERY,
        help="how often the host is reconciled",
    ),
    Setting(
        "lease_retention",
        _seconds,
        defaults.LEASE_RETENTION,
        help="how long ended leases stay in the lease table (revoked ones: longer, see docs)",
    ),
    Setting(
        "exec_grace",
        _seconds,
        10.0,
        help="when a grant ends: time between SIGTERM and SIGKILL for its exec commands",
    ),
    Setting(
        "breakglass_max",
        _seconds,
        defaults.BREAKGLASS_MAX,
        help="the longest access a break-glass code gives on this host",
    ),
    Setting(
        "end_sessions",
        _end_sessions,
        "exec",
        help="user: also end every process of the subject's user when their last grant ends",
    ),
)
BY_NAME: Final = {s.name: s for s in SETTINGS}
DURATIONS: Final = frozenset(s.name for s in SETTINGS if s.parse is _seconds)


@dataclass(frozen=True)
class Loaded:
    """Effective values by setting name, and the file's `[enforcers.*]` tables."""

    values: dict[str, Any]
    enforcer_tables: dict[str, Any]
    config_file: Path | None
    # The flags given (a reload reads the file and the environment again; flags still win).
    flags: Mapping[str, object]
    # Where each value came from: 0 default, 1 file, 2 environment, 3 flag.
    layers: dict[str, int]


def load(
    config_file: Path | None,
    flags: Mapping[str, object],
    environ: Mapping[str, str] | None = None,
) -> Loaded:
    """Defaults, then the file, then the environment, then the flags that were given."""
    environ = os.environ if environ is None else environ
    raw: dict[str, tuple[object, str]] = {}
    layers: dict[str, int] = {}
    tables: dict[str, Any] = {}
    if config_file is not None:
        data = _read(config_file)
        enforcers = data.pop("enforcers", {})
        if not isinstance(enforcers, dict):
            raise ConfigError(f"{config_file}: enforcers must be a table of [enforcers.KIND]")
        tables = enforcers
        for key, value in data.items():
            if key not in BY_NAME:
                named = key if re.fullmatch(r"[a-z_]{1,40}", key) else "?"
                raise ConfigError(f"unknown setting {named!r} in {config_file}")
            raw[key] = (value, f"{key} in {config_file}")
            layers[key] = 1
    for setting in SETTINGS:
        if environ.get(setting.env):
            raw[setting.name] = (environ[setting.env], setting.env)
            layers[setting.name] = 2
    for name, value in flags.items():
        raw[name] = (value, BY_NAME[name].flag)
        layers[name] = 3
    values = {s.name: s.default for s in SETTINGS}
    for name, (value, where) in raw.items():
        values[name] = BY_NAME[name].parse(value, where)
    return Loaded(values, tables, config_file, dict(flags), layers)


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read --config {path} ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path} is not valid TOML: {exc}") from None


def join_token(loaded: Loaded) -> str | None:
    """From join_token_file when given (a secret in a file), else join_token."""
    path = loaded.values.get("join_token_file")
    if path:
        try:
            text: str = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            raise ConfigError(f"join_token_file: cannot read {path}") from None
        return text or None
    token = loaded.values.get("join_token")
    return str(token) if token else None


def printable(loaded: Loaded) -> dict[str, Any]:
    """The effective settings for --print-config: secrets masked, durations as 15m."""
    out: dict[str, Any] = {}
    for setting in SETTINGS:
        value = loaded.values.get(setting.name)
        if value is None or value == [] or value == {}:
            continue
        if setting.secret:
            value = MASK
        elif setting.name in DURATIONS:
            value = format_duration(timedelta(seconds=float(value)))
        out[setting.name] = value
    if loaded.enforcer_tables:
        out["enforcers"] = loaded.enforcer_tables
    return out


def transport(loaded: Loaded) -> tuple[Path | None, bool]:
    """The CA file and plain-text choice by the rule every client keeps (jitmesh.tls): when both
    are given, the one from the later layer wins (a flag beats the environment beats the file);
    from the same layer they clash."""
    from jitmesh import errors, tls

    values = loaded.values
    ca_file, insecure = values.get("ca_file") or None, values.get("insecure")
    if ca_file and insecure:
        ca_layer, insecure_layer = loaded.layers.get("ca_file", 0), loaded.layers["insecure"]
        if ca_layer > insecure_layer:
            insecure = None
        elif insecure_layer > ca_layer:
            ca_file = None
    try:
        chosen = tls.choose(values["coordinator"], ca_file=ca_file, insecure=insecure, environ={})
        if chosen.ca_file is not None:
            tls.read_ca_file(chosen.ca_file)
    except errors.JitmeshError as exc:
        raise ConfigError(str(exc)) from None
    return chosen.ca_file, chosen.insecure
