"""Agent configuration: frozen pydantic models, validated once at the edge (`__main__`).

Inside the agent, plain frozen dataclasses take over (`LinkSettings`, enforcer `Hooks`).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from agent.domain.errors import ConfigError
from jitmesh import validation
from jitmesh.durations import DurationError, parse_duration

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_RESERVED_ENV = frozenset({"JITMESH_SUBJECT", "JITMESH_ACTION"})
_PLACEHOLDERS = ("{subject}", "{action}")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExecHooksConfig(_Frozen):
    """The YAML file of an `exec:FILE` enforcer."""

    apply: tuple[str, ...] = Field(min_length=1, max_length=64)
    remove: tuple[str, ...] = Field(min_length=1, max_length=64)
    observe: tuple[str, ...] | None = Field(default=None, min_length=1, max_length=64)
    timeout: timedelta = timedelta(seconds=10)
    env: dict[str, str] = Field(default_factory=dict, max_length=64)

    @field_validator("apply", "remove", "observe")
    @classmethod
    def _argv(cls, argv: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if argv is None:
            return None
        if not argv[0]:
            raise ValueError("the program (first element) must not be empty")
        if any("\0" in part or len(part) > 4096 for part in argv):
            raise ValueError("argv elements must be under 4096 characters, without NUL")
        return argv

    @field_validator("observe")
    @classmethod
    def _observe_has_no_pair(cls, argv: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if argv is not None and any(p in part for part in argv for p in _PLACEHOLDERS):
            raise ValueError("observe runs for all pairs: it takes no {subject} or {action}")
        return argv

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> timedelta:
        if isinstance(value, bool):
            raise ValueError("timeout must be a duration such as 10s")
        if isinstance(value, int | float):
            value = f"{int(value * 1000)}ms"
        if not isinstance(value, str):
            raise ValueError("timeout must be a duration such as 10s")
        try:
            result = parse_duration(value)
        except DurationError as exc:
            raise ValueError(str(exc)) from None
        if result > timedelta(minutes=10):
            raise ValueError("timeout must be at most 10m")
        return result

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            if not _ENV_KEY.fullmatch(key):
                raise ValueError("env names must be letters, digits and _")
            # The hook environment is fixed on purpose; loader variables and the per-call
            # variables cannot be set from configuration either.
            if key.startswith("LD_") or key in _RESERVED_ENV:
                raise ValueError("env must not set LD_* or JITMESH_SUBJECT/JITMESH_ACTION")
            if "\0" in value or len(value) > 4096:
                raise ValueError("env values must be under 4096 characters, without NUL")
        return env


# What the drift reconcile does with access an enforcer shows that no lease holds: take it away,
# or only report it (audited on the coordinator, left in place).
DriftSetting = Literal["remove", "report"]


class FileEnforcerConfig(_Frozen):
    kind: Literal["file"] = "file"
    directory: Path
    drift: DriftSetting = "remove"


class ExecEnforcerConfig(_Frozen):
    kind: Literal["exec"] = "exec"
    path: Path
    hooks: ExecHooksConfig
    drift: DriftSetting = "remove"


EnforcerConfig = Annotated[FileEnforcerConfig | ExecEnforcerConfig, Field(discriminator="kind")]


class AgentConfig(_Frozen):
    coordinator: str = Field(min_length=1, max_length=255, pattern=r"^[^\s]+$")
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    join_token: SecretStr | None = None
    # The coordinator's CA certificate: enroll with a CSR over TLS and connect with mTLS only.
    ca_file: Path | None = None
    state_dir: Path
    enforcers: tuple[EnforcerConfig, ...] = ()
    backoff_base: float = Field(default=1.0, ge=0, le=3600)
    backoff_cap: float = Field(default=60.0, ge=0, le=3600)
    backoff_reset_after: float = Field(default=30.0, ge=0, le=3600)
    # Used when the coordinator's Welcome names no heartbeat interval.
    heartbeat: float = Field(default=10.0, gt=0, le=3600)
    keepalive_time: float = Field(default=30.0, gt=0, le=3600)
    keepalive_timeout: float = Field(default=10.0, gt=0, le=3600)
    welcome_timeout: float = Field(default=30.0, gt=0, le=3600)
    # A revoke's removal is tried this many times (jittered exponential backoff from the base)
    # before the grant is reported REVOKE_FAILED; the sweep keeps retrying after that.
    remove_retries: int = Field(default=6, ge=1, le=20)
    remove_retry_base: float = Field(default=10.0, ge=0, le=3600)
    # Grants whose issue time differs from the agent's clock by more are refused.
    skew_tolerance: float = Field(default=60.0, gt=0, le=86400)
    # Seconds between drift reconciles (host against lease table) while running.
    reconcile_every: float = Field(default=300.0, gt=0, le=86400)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        try:
            return validation.check(validation.AGENT, value, "name")
        except validation.ValidationError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        try:
            return validation.check_labels(value)
        except validation.ValidationError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("join_token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            return None
        return value


def parse_exec_hooks(text: str) -> ExecHooksConfig:
    """Parse an exec enforcer's YAML (YAML 1.2: `NO` stays a string, `12:30` is not a number)."""
    from pydantic import ValidationError
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        data = YAML(typ="safe", pure=True).load(text)
    except YAMLError:
        raise ConfigError("exec hooks file is not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError("exec hooks file must be a mapping (apply, remove, observe, ...)")
    try:
        return ExecHooksConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"exec hooks file: {describe(exc)}") from None


def load_exec_hooks(path: Path) -> ExecHooksConfig:
    """Read an exec enforcer's hooks file. The file, every hook program and every directory
    above them must be writable by their owner (root or this user) only: anyone else who could
    change them could run code as the agent."""
    try:
        check_private(path, "exec hooks file")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read exec hooks file ({exc.strerror})") from None
    hooks = parse_exec_hooks(text)
    for argv in (hooks.apply, hooks.remove, hooks.observe):
        if argv is None:
            continue
        program = shutil.which(argv[0])
        if program is None:
            raise ConfigError("exec hook program not found or not executable")
        try:
            check_private(Path(program), "exec hook program")
        except OSError as exc:
            raise ConfigError(f"cannot check exec hook program ({exc.strerror})") from None
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


def parse_enforcer(spec: str) -> EnforcerConfig:
    """`KIND[,drift=remove|report]:WHERE`: `file:DIR` or `exec:FILE` (the exec hooks file is
    read and validated here), optionally with the enforcer's drift setting."""
    head, sep, where = spec.partition(":")
    if not sep or not where:
        raise ConfigError("enforcer must be file:DIR or exec:FILE")
    kind, *options = head.split(",")
    if kind not in ("file", "exec"):
        raise ConfigError("enforcer must be file:DIR or exec:FILE")
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
    return ExecEnforcerConfig(path=Path(where), hooks=load_exec_hooks(Path(where)), drift=drift)


def describe(exc: Any) -> str:
    """A pydantic ValidationError as `field: problem; ...`, without the offending input."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "value"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
