"""The coordinator's settings: one TOML file (`--config`), then `JITMESH_*` environment
variables, then flags, each overriding the one before; validated once, here, by
pydantic-settings, then turned into the frozen `CoordinatorConfig` the parts are built from.

Every setting has one name used three ways: `log_level` in the file, `JITMESH_LOG_LEVEL` in the
environment, `--log-level` on the command line. Durations are written as `15m`, `1h30m` or `10s`
(a bare number is read as seconds, as the flags took before). Secrets come from files
(`admin_token_file`), never from the file itself or a flag; `--print-config` shows the
effective values with secrets masked.
"""

from __future__ import annotations

import re
import tomllib
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PlainSerializer, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from jitmesh.durations import DurationError, format_duration, parse_duration
from jitmesh.logs import LEVELS, LogLevelError, parse_level

ENV_PREFIX = "JITMESH_"
_SECONDS = re.compile(r"\d+(\.\d+)?")

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("jitmesh_config_file", default=None)


class SettingsError(Exception):
    """The configuration is not valid; the message names the setting and where it came from."""


def _duration(value: object) -> object:
    if isinstance(value, str) and _SECONDS.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except DurationError as exc:
            raise ValueError(str(exc)) from None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    return value


# "15m" in, timedelta inside, "15m" out (in --print-config).
Duration = Annotated[
    timedelta,
    BeforeValidator(_duration),
    PlainSerializer(format_duration, return_type=str),
]


def _listen(value: object) -> object:
    if not isinstance(value, str):
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:7443")
    return value


Listen = Annotated[str, BeforeValidator(_listen)]


def split_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


# Settings never read from the environment. JITMESH_INSECURE is the clients' switch (jitctl, the
# SDK and the agent speak plain text with it, and the dev coordinator's dev.env sets it): a shell
# that sourced dev.env must not start `serve` without TLS.
NOT_FROM_ENV = frozenset({"insecure"})


class _Environment(EnvSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if field_name in NOT_FROM_ENV:
            return None, field_name, False
        return super().get_field_value(field, field_name)


class CoordinatorSettings(BaseSettings):
    """What `jitmesh-coordinator serve` and `dev` can be told. Field order is the order of
    `--print-config`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        # Flags arrive by field name; unknown environment variables are not ours to refuse.
        populate_by_name=True,
    )

    data: Path | None = Field(default=None, description="data directory")
    listen: Listen = Field(default="127.0.0.1:7443", description="operator address HOST:PORT")
    agent_port: int | None = Field(
        default=None, ge=0, le=65535, description="mTLS port for agents (default: listen + 1)"
    )
    policy: Path | None = Field(default=None, description="initial policy if none is stored")
    insecure: bool = Field(default=False, description="serve without TLS: testing only")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_names: tuple[str, ...] = ()
    auditor_groups: tuple[str, ...] = Field(
        default=(),
        description="a group whose members read the whole audit log and every request and "
        "grant (never named in the policy document)",
    )
    admin_token_file: Path | None = Field(
        default=None, description="file holding the bootstrap admin token (default: DATA/)"
    )
    log_level: str = Field(default="info", description=f"one of {', '.join(LEVELS)}")
    log_format: Literal["console", "json"] = "console"
    log_target: Literal["stderr", "syslog"] = Field(
        default="stderr", description="where log lines go: stderr or syslog"
    )
    syslog_address: str = Field(
        default="/dev/log",
        description="with log_target syslog: the daemon's socket path, or HOST:PORT over UDP",
    )
    metrics_listen: Listen | None = Field(
        default=None, description="serve Prometheus metrics on HOST:PORT (off by default)"
    )
    command_log_retention: Duration = Field(
        default=timedelta(minutes=1),
        description="how often each agent's command log is truncated behind its acknowledged "
        "position (0: never)",
    )
    otel: bool = Field(
        default=False,
        description="trace gRPC calls with OpenTelemetry, exported over OTLP as the OTEL_* "
        "variables say (needs pip install 'jitmesh[otel]')",
    )
    heartbeat: Duration = timedelta(seconds=10)
    keepalive: Duration = timedelta(seconds=30)
    keepalive_timeout: Duration = timedelta(seconds=10)
    agent_queue_limit: int = Field(default=1000, ge=10)
    agent_undelivered_limit: int | None = Field(
        default=None,
        ge=1,
        description="grant commands one agent may have undelivered before new grants for it are"
        " pushed back (default: half of agent_queue_limit)",
    )
    request_rate: float = Field(default=1.0, gt=0)
    request_burst: int = Field(default=30, ge=1)
    enroll_rate: float = Field(default=0.5, gt=0)
    enroll_burst: int = Field(default=20, ge=1)
    enroll_overall_rate: float = Field(default=50.0, gt=0)
    enroll_overall_burst: int = Field(default=500, ge=1)
    # Single sign-on (docs/sign-in.md).
    oidc_issuer: str = Field(default="", description="trusted OpenID Connect issuer URL")
    oidc_client_id: str = Field(default="", description="audience of accepted ID tokens")
    oidc_username_claim: str = "preferred_username"
    oidc_groups_claim: str = "groups"
    oidc_token_ttl: Duration = Field(
        default=timedelta(hours=1), description="how long a sign-in token lasts"
    )
    # Notifications (docs/notifications.md).
    web_url: str = Field(default="", description="jitmesh-web's address, for links")
    notify_expiry_warning: Duration = Field(
        default=timedelta(minutes=10), description="warn this long before a grant ends (0: off)"
    )
    slack_signing_secret_file: Path | None = Field(
        default=None,
        description="serve Slack's interaction endpoint with the signing secret in this file",
    )
    slack_listen: Listen = Field(
        default="127.0.0.1:0", description="HOST:PORT of the Slack interaction endpoint"
    )
    watchdog: bool = Field(
        default=True, description="answer systemd's watchdog when WATCHDOG_USEC is set"
    )
    # Several replicas on PostgreSQL (docs/scaling.md).
    store: str = Field(
        default="",
        description="postgresql://USER@HOST/DB shared by replicas (default: SQLite in data); "
        "a password comes from PGPASSWORD or ~/.pgpass, never from here",
    )
    replica: str = Field(default="", description="this replica's id (default: DATA/replica.id)")
    secret_key_file: Path | None = Field(
        default=None,
        description="with a PostgreSQL store: the key encrypting the shared signing keys and CA "
        "(else JITMESH_SECRET_KEY)",
    )

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        try:
            parse_level(value)
        except LogLevelError as exc:
            raise ValueError(str(exc)) from None
        return value.strip().lower()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: flags, then the environment, then the file.
        sources: list[PydanticBaseSettingsSource] = [init_settings, _Environment(settings_cls)]
        path = _CONFIG_FILE.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    def masked(self) -> dict[str, Any]:
        """The effective values for --print-config: durations as 15m, paths as text, and no
        secret (none is held here: secrets stay in their files, named by path)."""
        values = self.model_dump(mode="json")
        if values.get("store"):
            # A password written into the URL anyway is not printed.
            values["store"] = re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", values["store"])
        return {k: v for k, v in values.items() if v is not None}


# Settings whose flag was spelled differently before this file existed.
FLAG_NAMES = {
    "data": "--data",
    "policy": "--policy",
    "tls_names": "--tls-name",
    "auditor_groups": "--auditor-group",
}


def load(config_file: Path | None, flags: dict[str, Any]) -> CoordinatorSettings:
    """The effective settings from the file, the environment and the flags that were given
    (`flags` holds only those: a default flag value must not hide the file's value)."""
    if config_file is not None:
        try:
            with config_file.open("rb") as f:
                tomllib.load(f)
        except OSError as exc:
            raise SettingsError(f"cannot read --config {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"--config {config_file} is not valid TOML: {exc}") from None
    token = _CONFIG_FILE.set(config_file)
    try:
        return CoordinatorSettings(**flags)
    except ValidationError as exc:
        raise SettingsError(describe(exc, config_file)) from None
    finally:
        _CONFIG_FILE.reset(token)


def describe(exc: ValidationError, config_file: Path | None) -> str:
    """One line naming the setting in all its spellings, never echoing the value."""
    first = exc.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else ""
    if first["type"] == "extra_forbidden":
        where = f" in {config_file}" if config_file else ""
        return f"unknown setting {name!r}{where}"
    if not name:
        return "a setting is not valid"
    flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
    message = str(first["msg"]).removeprefix("Value error, ")
    also = f"{ENV_PREFIX}{name.upper()}, or {name} in the config file"
    return f"{flag}: {message[:1].lower()}{message[1:]} (also {also})"
