"""Agent configuration: frozen dataclasses, validated once at the edge (`__main__`), where they
are built.

Not pydantic (STYLE.md's default for configuration), on purpose: the agent runs on every host and
pydantic with its schemas is about 12 MiB of the agent's 50 MiB resident-memory budget
(docs/performance.md). Each field is checked in `__post_init__`; a bad value raises ConfigError
naming the field, never echoing the value.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from agent import defaults
from agent.domain.errors import ConfigError
from jitmesh import validation
from jitmesh.durations import MAX_DURATION, DurationError, parse_duration

if TYPE_CHECKING:
    from agent.enforcers.group import GroupSettings
    from agent.enforcers.ssh import SshSettings
    from agent.enforcers.sudo import SudoSettings

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_RESERVED_ENV = frozenset({"JITMESH_SUBJECT", "JITMESH_ACTION"})
_PLACEHOLDERS = ("{subject}", "{action}")
_MAX_ARGV = 64
_MAX_ENV = 64
_MAX_PART = 4096
_COORDINATOR = re.compile(r"[^\s]{1,255}")
MAX_HOOK_TIMEOUT = timedelta(minutes=10)


class SecretLike(Protocol):
    def get_secret_value(self) -> str: ...


class Secret:
    """A value kept out of repr and logs (the join token)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecHooksConfig:
    """The YAML file of an `exec:FILE` enforcer."""

    apply: tuple[str, ...]
    remove: tuple[str, ...]
    observe: tuple[str, ...] | None = None
    timeout: timedelta = timedelta(seconds=10)
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _set(self, "apply", _argv(self.apply, "apply"))
        _set(self, "remove", _argv(self.remove, "remove"))
        if self.observe is not None:
            observe = _argv(self.observe, "observe")
            if any(p in part for part in observe for p in _PLACEHOLDERS):
                raise ConfigError("observe: runs for all pairs: it takes no {subject} or {action}")
            _set(self, "observe", observe)
        _set(self, "timeout", _timeout(self.timeout))
        _set(self, "env", _env(self.env))


# What the drift reconcile does with access an enforcer shows that no lease holds: take it away,
# or only report it (audited on the coordinator, left in place).
DriftSetting = Literal["remove", "report"]
_DRIFT_SETTINGS: tuple[DriftSetting, ...] = ("remove", "report")


def _drift(value: object) -> DriftSetting:
    for setting in _DRIFT_SETTINGS:
        if value == setting:
            return setting
    raise ConfigError("drift: must be remove or report")


@dataclass(frozen=True, slots=True, kw_only=True)
class FileEnforcerConfig:
    directory: Path
    drift: DriftSetting = "remove"
    kind: str = field(default="file", init=False)

    def __post_init__(self) -> None:
        _set(self, "directory", _path(self.directory, "directory"))
        _set(self, "drift", _drift(self.drift))


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecEnforcerConfig:
    path: Path
    hooks: ExecHooksConfig
    drift: DriftSetting = "remove"
    kind: str = field(default="exec", init=False)

    def __post_init__(self) -> None:
        _set(self, "path", _path(self.path, "path"))
        if not isinstance(self.hooks, ExecHooksConfig):
            raise ConfigError("hooks: must be an ExecHooksConfig")
        _set(self, "drift", _drift(self.drift))


@dataclass(frozen=True, slots=True, kw_only=True)
class SudoEnforcerConfig:
    """`[enforcers.sudo]` of an agent TOML file (`--enforcer sudo:FILE`)."""

    path: Path
    settings: SudoSettings
    drift: DriftSetting = "remove"
    kind: str = field(default="sudo", init=False)

    def __post_init__(self) -> None:
        _set(self, "path", _path(self.path, "path"))
        _set(self, "drift", _drift(self.drift))


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupEnforcerConfig:
    """`[enforcers.group]` of an agent TOML file (`--enforcer group:FILE`)."""

    path: Path
    settings: GroupSettings
    drift: DriftSetting = "remove"
    kind: str = field(default="group", init=False)

    def __post_init__(self) -> None:
        _set(self, "path", _path(self.path, "path"))
        _set(self, "drift", _drift(self.drift))


@dataclass(frozen=True, slots=True, kw_only=True)
class SshEnforcerConfig:
    """`[enforcers.ssh]` of an agent TOML file (`--enforcer ssh:FILE`)."""

    path: Path
    settings: SshSettings
    drift: DriftSetting = "remove"
    kind: str = field(default="ssh", init=False)

    def __post_init__(self) -> None:
        _set(self, "path", _path(self.path, "path"))
        _set(self, "drift", _drift(self.drift))


EnforcerConfig = (
    FileEnforcerConfig
    | ExecEnforcerConfig
    | SudoEnforcerConfig
    | GroupEnforcerConfig
    | SshEnforcerConfig
)


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    coordinator: str
    name: str
    state_dir: Path
    labels: Mapping[str, str] = field(default_factory=dict)
    # Given as a string or a secret (anything with get_secret_value); kept as a Secret.
    join_token: SecretLike | str | None = field(default=None, repr=False)
    # The coordinator's CA certificate: enroll with a CSR over TLS and connect with mTLS only.
    ca_file: Path | None = None
    # Plain text (a development or --insecure coordinator): bearer credentials, no TLS. One of
    # ca_file and insecure must be given: the agent never falls back to plain text by itself.
    insecure: bool = False
    enforcers: tuple[EnforcerConfig, ...] = ()
    backoff_base: float = defaults.BACKOFF_BASE
    backoff_cap: float = defaults.BACKOFF_CAP
    backoff_reset_after: float = 30.0
    # Used when the coordinator's Welcome names no heartbeat interval.
    heartbeat: float = defaults.HEARTBEAT
    keepalive_time: float = defaults.KEEPALIVE
    keepalive_timeout: float = defaults.KEEPALIVE_TIMEOUT
    welcome_timeout: float = 30.0
    # A revoke's removal is tried this many times (jittered exponential backoff from the base)
    # before the grant is reported REVOKE_FAILED; the sweep keeps retrying after that.
    remove_retries: int = defaults.REMOVE_RETRIES
    remove_retry_base: float = defaults.REMOVE_RETRY_BASE
    # Grants whose issue time differs from the agent's clock by more are refused.
    skew_tolerance: float = defaults.SKEW_TOLERANCE
    # Seconds between drift reconciles (host against lease table) while running.
    reconcile_every: float = defaults.RECONCILE_EVERY
    # Ended leases stay in the lease table at least this long (agent/domain/retention.py).
    lease_retention: float = defaults.LEASE_RETENTION
    # Prometheus metrics on HOST:PORT (None: off, and the exporter is never imported).
    metrics_listen: str | None = None
    # Answer systemd's watchdog when it asks for one (WATCHDOG_USEC).
    watchdog: bool = True
    # Seconds between SIGTERM and SIGKILL when a grant's end ends a command or a session.
    exec_grace: float = 10.0
    # The longest lease a break-glass code gives here (seconds), whatever the code says.
    breakglass_max: float = defaults.BREAKGLASS_MAX
    # "exec": end what was started through `exec` when its grant ends; "user": also every
    # process of the subject's user when their last grant on the host ends.
    end_sessions: str = "exec"

    def __post_init__(self) -> None:
        if not isinstance(self.coordinator, str) or not _COORDINATOR.fullmatch(self.coordinator):
            raise ConfigError("coordinator: must be host:port, without spaces, 1-255 characters")
        try:
            validation.check(validation.AGENT, self.name, "name")
            if not isinstance(self.labels, Mapping):
                raise validation.ValidationError("labels must be a mapping")
            labels = validation.check_labels(dict(self.labels))
        except validation.ValidationError as exc:
            raise ConfigError(str(exc)) from None
        _set(self, "labels", labels)
        _set(self, "join_token", _secret(self.join_token))
        _set(self, "state_dir", _path(self.state_dir, "state_dir"))
        if self.ca_file is not None:
            _set(self, "ca_file", _path(self.ca_file, "ca_file"))
        if self.insecure not in (True, False):
            raise ConfigError("insecure: must be true or false")
        if self.ca_file is None and not self.insecure:
            raise ConfigError(
                "the agent speaks TLS to the coordinator: give the coordinator's CA certificate "
                "(its DATA/ca/ca.pem) with --ca-file or JITMESH_CA_FILE, or --insecure "
                "(JITMESH_INSECURE=1) for a development coordinator"
            )
        if self.ca_file is not None and self.insecure:
            raise ConfigError("give --ca-file or --insecure, not both")
        enforcers = tuple(self.enforcers)
        kinds = (
            FileEnforcerConfig
            | ExecEnforcerConfig
            | SudoEnforcerConfig
            | GroupEnforcerConfig
            | SshEnforcerConfig
        )
        if not all(isinstance(e, kinds) for e in enforcers):
            raise ConfigError("enforcers: each must be a file, exec, sudo, group or ssh enforcer")
        _set(self, "enforcers", enforcers)
        for name in ("backoff_base", "backoff_cap", "backoff_reset_after", "remove_retry_base"):
            _set(self, name, _number(getattr(self, name), name, low=0, high=3600))
        for name in ("heartbeat", "keepalive_time", "keepalive_timeout", "welcome_timeout"):
            _set(self, name, _number(getattr(self, name), name, low=0, high=3600, open_low=True))
        _set(self, "exec_grace", _number(self.exec_grace, "exec_grace", low=0, high=3600))
        _set(
            self,
            "breakglass_max",
            _number(self.breakglass_max, "breakglass_max", low=1, high=86400),
        )
        if self.end_sessions not in ("exec", "user"):
            raise ConfigError("end_sessions: must be exec or user")
        for name in ("skew_tolerance", "reconcile_every"):
            _set(self, name, _number(getattr(self, name), name, low=0, high=86400, open_low=True))
        _set(
            self,
            "lease_retention",
            _number(
                self.lease_retention, "lease_retention", low=0, high=MAX_DURATION.total_seconds()
            ),
        )
        retries = self.remove_retries
        if isinstance(retries, bool) or not isinstance(retries, int) or not 1 <= retries <= 20:
            raise ConfigError("remove_retries: must be a whole number from 1 to 20")

    def join_token_value(self) -> str | None:
        token = self.join_token
        return token.get_secret_value() if isinstance(token, Secret) else None


def _set(obj: object, name: str, value: object) -> None:
    # Normalizing a frozen dataclass's own fields while it is being built.
    object.__setattr__(obj, name, value)


def _secret(value: object) -> Secret | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value
    elif callable(getattr(value, "get_secret_value", None)):
        text = value.get_secret_value()  # type: ignore[attr-defined]
        if not isinstance(text, str):
            raise ConfigError("join_token: must be a string")
    else:
        raise ConfigError("join_token: must be a string")
    # A blank token is no token.
    return Secret(text) if text.strip() else None


def _path(value: object, name: str) -> Path:
    if isinstance(value, Path):
        return value
    if isinstance(value, str) and value and "\0" not in value:
        return Path(value)
    raise ConfigError(f"{name}: must be a path")


def _number(value: object, name: str, *, low: float, high: float, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name}: must be a number")
    if value > high or value < low or (open_low and value == low):
        above = "above" if open_low else "at least"
        raise ConfigError(f"{name}: must be {above} {low:g} and at most {high:g}")
    return float(value)


def _argv(value: object, name: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{name}: must be a list of strings (program and arguments)")
    if not 1 <= len(value) <= _MAX_ARGV:
        raise ConfigError(f"{name}: must have 1 to {_MAX_ARGV} elements")
    if not value[0]:
        raise ConfigError(f"{name}: the program (first element) must not be empty")
    if any("\0" in part or len(part) > _MAX_PART for part in value):
        raise ConfigError(f"{name}: argv elements must be under 4096 characters, without NUL")
    return tuple(value)


def _timeout(value: object) -> timedelta:
    if isinstance(value, timedelta):
        result = value
    elif isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError("timeout: must be a duration such as 10s")
    else:
        text = f"{int(value * 1000)}ms" if isinstance(value, int | float) else value
        try:
            result = parse_duration(text)
        except DurationError as exc:
            raise ConfigError(f"timeout: {exc}") from None
    if result <= timedelta(0):
        raise ConfigError("timeout: must be a duration such as 10s")
    if result > MAX_HOOK_TIMEOUT:
        raise ConfigError("timeout: must be at most 10m")
    return result


def _env(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError("env: must be a mapping of names to strings")
    if len(value) > _MAX_ENV:
        raise ConfigError(f"env: at most {_MAX_ENV} variables")
    env: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _ENV_KEY.fullmatch(key):
            raise ConfigError("env: env names must be letters, digits and _")
        # The hook environment is fixed on purpose; loader variables and the per-call variables
        # cannot be set from configuration either.
        if key.startswith("LD_") or key in _RESERVED_ENV:
            raise ConfigError("env: must not set LD_* or JITMESH_SUBJECT/JITMESH_ACTION")
        if not isinstance(item, str):
            raise ConfigError("env: values must be strings (quote them in YAML)")
        if "\0" in item or len(item) > _MAX_PART:
            raise ConfigError("env: values must be under 4096 characters, without NUL")
        env[key] = item
    return env


_HOOK_FIELDS = frozenset({"apply", "remove", "observe", "timeout", "env"})


def parse_exec_hooks(text: str) -> ExecHooksConfig:
    """Parse an exec enforcer's YAML (YAML 1.2: `NO` stays a string, `12:30` is not a number)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        data = YAML(typ="safe", pure=True).load(text)
    except YAMLError:
        raise ConfigError("exec hooks file is not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError("exec hooks file must be a mapping (apply, remove, observe, ...)")
    unknown = [key for key in data if key not in _HOOK_FIELDS]
    if unknown:
        # Named only when it looks like a field name: the message never echoes arbitrary input.
        key = unknown[0]
        named = f" {key}" if isinstance(key, str) and _ENV_KEY.fullmatch(key) else ""
        raise ConfigError(f"exec hooks file: unknown field{named} (allowed: {_allowed()})")
    for required in ("apply", "remove"):
        if required not in data:
            raise ConfigError(f"exec hooks file: {required}: is required")
    values: dict[str, Any] = dict(data)
    try:
        return ExecHooksConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"exec hooks file: {exc}") from None


def _allowed() -> str:
    return ", ".join(sorted(_HOOK_FIELDS))


def load_exec_hooks(path: Path) -> ExecHooksConfig:
    """Read an exec enforcer's hooks file. The file, every hook program and every directory
    above them must be writable by their owner (root or this user) only: anyone else who could
    change them could run code as the agent."""
    try:
        check_private(path, "exec hooks file")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read exec hooks file {path} ({exc.strerror}): write one (docs/host.md, "
            '"The exec enforcer\'s hooks file") or fix the path after exec:'
        ) from None
    hooks = parse_exec_hooks(text)
    for argv in (hooks.apply, hooks.remove, hooks.observe):
        if argv is None:
            continue
        program = shutil.which(argv[0])
        if program is None:
            # The hooks file's own text, not the caller's: its owner wrote it (check_private).
            raise ConfigError(f"exec hook program {argv[0]} not found or not executable")
        try:
            check_private(Path(program), "exec hook program")
        except OSError as exc:
            raise ConfigError(
                f"cannot check exec hook program {program} ({exc.strerror})"
            ) from None
    return hooks


def check_private(path: Path, what: str) -> None:
    """Refuse `path` (symlinks followed) when it, or a directory above it, is owned by another
    user or writable by group or others. Sticky directories (/tmp) are allowed: there nobody
    can replace another user's entries."""
    resolved = path.resolve(strict=True)
    for candidate in (resolved, *resolved.parents):
        st = candidate.stat()
        if st.st_uid not in (0, os.getuid()):
            raise ConfigError(f"{what}: {candidate} is owned by another user")
        sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
        if st.st_mode & 0o022 and not sticky_dir:
            raise ConfigError(f"{what}: {candidate} is writable by group or others")


def _section(path: Path, kind: str) -> dict[str, Any]:
    """`[enforcers.KIND]` of an agent TOML file. The file must be writable by its owner (root
    or this user) only: whoever can change it decides who gets which privilege."""
    import tomllib

    try:
        check_private(path, f"{kind} configuration")
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {kind} configuration {path} ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{kind} configuration is not valid TOML") from None
    enforcers = data.get("enforcers")
    section = enforcers.get(kind) if isinstance(enforcers, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f"{kind} configuration: no [enforcers.{kind}] section")
    return section


def load_sudo(path: Path) -> SudoSettings:
    from agent.enforcers.sudo import settings_from

    try:
        return settings_from(_section(path, "sudo"))
    except ValueError as exc:
        raise ConfigError(f"[enforcers.sudo] {exc}") from None


def load_group(path: Path) -> GroupSettings:
    from agent.enforcers.group import settings_from

    try:
        return settings_from(_section(path, "group"))
    except ValueError as exc:
        raise ConfigError(f"[enforcers.group] {exc}") from None


def load_ssh(path: Path) -> SshSettings:
    from agent.enforcers.ssh import settings_from

    try:
        return settings_from(_section(path, "ssh"))
    except ValueError as exc:
        raise ConfigError(f"[enforcers.ssh] {exc}") from None


_KINDS = "file:DIR, exec:FILE or sudo|group|ssh:FILE.toml"


def parse_enforcer(spec: str) -> EnforcerConfig:
    """`KIND[,drift=remove|report]:WHERE`: `file:DIR`, `exec:FILE` or `sudo:FILE.toml` (files are
    read and validated here), optionally with the enforcer's drift setting."""
    head, sep, where = spec.partition(":")
    if not sep or not where:
        raise ConfigError(f"enforcer must be {_KINDS}")
    kind, *options = head.split(",")
    if kind not in ("file", "exec", "sudo", "group", "ssh"):
        raise ConfigError(f"enforcer must be {_KINDS}")
    drift: DriftSetting = "remove"
    for option in options:
        key, eq, value = option.partition("=")
        if key != "drift" or not eq:
            raise ConfigError(f"enforcer {kind}: unknown option (expected drift=remove|report)")
        if value == "remove":
            drift = "remove"
        elif value == "report":
            drift = "report"
        else:
            raise ConfigError(f"enforcer {kind}: drift must be remove or report")
    if kind == "file":
        return FileEnforcerConfig(directory=Path(where), drift=drift)
    if kind == "sudo":
        return SudoEnforcerConfig(path=Path(where), settings=load_sudo(Path(where)), drift=drift)
    if kind == "group":
        return GroupEnforcerConfig(path=Path(where), settings=load_group(Path(where)), drift=drift)
    if kind == "ssh":
        return SshEnforcerConfig(path=Path(where), settings=load_ssh(Path(where)), drift=drift)
    return ExecEnforcerConfig(path=Path(where), hooks=load_exec_hooks(Path(where)), drift=drift)


def enforcers_from_tables(
    tables: Mapping[str, Any], config_file: Path | None
) -> list[EnforcerConfig]:
    """`[enforcers.KIND]` tables of the agent's --config file, in the file's order:
    `[enforcers.file] directory = "DIR"` and `[enforcers.exec] hooks = "FILE"` (each with an
    optional `drift = "remove" | "report"`), and `[enforcers.sudo]`, `[enforcers.group]` and
    `[enforcers.ssh]` in those enforcers' own formats (the sections `--enforcer KIND:FILE.toml`
    reads)."""
    found: list[EnforcerConfig] = []
    for kind, table in tables.items():
        where = f"[enforcers.{kind}]" if isinstance(kind, str) and kind.isidentifier() else "?"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where} must be a table")
        drift = _drift(table.get("drift", "remove"))
        if kind == "file":
            if set(table) - {"directory", "drift"}:
                raise ConfigError(f"{where}: allowed keys are directory and drift")
            found.append(
                FileEnforcerConfig(directory=_path(table.get("directory"), where), drift=drift)
            )
        elif kind == "exec":
            if set(table) - {"hooks", "drift"}:
                raise ConfigError(f"{where}: allowed keys are hooks and drift")
            path = _path(table.get("hooks"), f"{where} hooks")
            found.append(ExecEnforcerConfig(path=path, hooks=load_exec_hooks(path), drift=drift))
        elif kind == "sudo" and config_file is not None:
            found.append(
                SudoEnforcerConfig(path=config_file, settings=load_sudo(config_file), drift=drift)
            )
        elif kind == "group" and config_file is not None:
            found.append(
                GroupEnforcerConfig(path=config_file, settings=load_group(config_file), drift=drift)
            )
        elif kind == "ssh" and config_file is not None:
            found.append(
                SshEnforcerConfig(path=config_file, settings=load_ssh(config_file), drift=drift)
            )
        else:
            raise ConfigError(f"{where}: unknown enforcer (file, exec, sudo, group or ssh)")
    return found
