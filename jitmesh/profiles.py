"""Named connection profiles in `~/.config/jitmesh/config.toml`, read by jitctl and the SDK.

    default_profile = "prod"          # optional; else the profile named "default"

    [profiles.prod]
    coordinator = "jit.example.com:7443"
    ca_file = "~/.config/jitmesh/prod-ca.pem"
    token_file = "~/.config/jitmesh/prod.token"

    [profiles.dev]
    coordinator = "127.0.0.1:7443"
    insecure = true
    token_file = "~/dev/dev-alice.token"

Each value is taken from the first place that has it: an explicit argument (a flag), then the
`JITMESH_*` variable (JITMESH_COORDINATOR, JITMESH_TOKEN, JITMESH_CA_FILE, JITMESH_INSECURE),
then the profile (chosen by argument, else JITMESH_PROFILE, else default_profile), then, for
the token only, the file `jitctl login` keeps it in when no profile names one
($JITMESH_TOKEN_FILE, else $XDG_CONFIG_HOME/jitmesh/token). Tokens are never written in this
file, only the path of a file that holds one. The file lives at $JITMESH_CONFIG, else
$XDG_CONFIG_HOME/jitmesh/config.toml. Standard library only.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from jitmesh import errors

ENV_CONFIG: Final = "JITMESH_CONFIG"
ENV_PROFILE: Final = "JITMESH_PROFILE"
ENV_COORDINATOR: Final = "JITMESH_COORDINATOR"
ENV_TOKEN: Final = "JITMESH_TOKEN"  # noqa: S105 (a variable's name)
ENV_CA_FILE: Final = "JITMESH_CA_FILE"
ENV_INSECURE: Final = "JITMESH_INSECURE"
ENV_TOKEN_FILE: Final = "JITMESH_TOKEN_FILE"  # noqa: S105 (a variable's name)


def token_file(environ: Mapping[str, str] | None = None) -> Path:
    """Where `jitctl login` keeps its token when no profile names a token_file:
    $JITMESH_TOKEN_FILE, else $XDG_CONFIG_HOME/jitmesh/token (~/.config/jitmesh/token)."""
    env = os.environ if environ is None else environ
    given = env.get(ENV_TOKEN_FILE)
    if given:
        return Path(given)
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "jitmesh" / "token"


def saved_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The token `jitctl login` kept in `token_file()`, or None."""
    try:
        return token_file(environ).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


DEFAULT_PROFILE: Final = "default"
_KEYS: Final = frozenset({"coordinator", "ca_file", "token_file", "insecure"})


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    coordinator: str | None = None
    ca_file: Path | None = None
    token_file: Path | None = None
    insecure: bool | None = None

    def token(self) -> str | None:
        if self.token_file is None:
            return None
        try:
            return self.token_file.read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError):
            raise errors.InvalidArgumentError(
                f"profile {self.name}: cannot read token_file {self.token_file}"
            ) from None


@dataclass(frozen=True, slots=True)
class Connection:
    """Where and how to connect, every value resolved (None: not given anywhere)."""

    coordinator: str | None
    token: str | None
    ca_file: str | None
    insecure: bool | None
    profile: str | None


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get(ENV_CONFIG):
        return Path(env[ENV_CONFIG]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "jitmesh" / "config.toml"


def load_profile(
    name: str | None = None, *, environ: Mapping[str, str] | None = None
) -> Profile | None:
    """The profile `name` (else JITMESH_PROFILE, else the file's default_profile, else
    "default"). None when there is no file, or no such profile and none was asked for by name."""
    env = os.environ if environ is None else environ
    path = config_path(env)
    asked = name or env.get(ENV_PROFILE) or None
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if asked:
            raise errors.InvalidArgumentError(
                f"profile {asked}: no configuration file at {path}"
            ) from None
        return None
    except OSError as exc:
        raise errors.InvalidArgumentError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise errors.InvalidArgumentError(f"{path} is not valid TOML: {exc}") from None
    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict):
        raise errors.InvalidArgumentError(f"{path}: profiles must be [profiles.NAME] tables")
    chosen = asked or str(data.get("default_profile", DEFAULT_PROFILE))
    table = profiles.get(chosen)
    if table is None:
        if asked:
            known = ", ".join(sorted(profiles)) or "none"
            raise errors.InvalidArgumentError(f"no profile {chosen} in {path} (profiles: {known})")
        return None
    return _profile(chosen, table, path)


def _profile(name: str, table: object, path: Path) -> Profile:
    where = f"{path} [profiles.{name}]"
    if not isinstance(table, dict):
        raise errors.InvalidArgumentError(f"{where} must be a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise errors.InvalidArgumentError(
            f"{where}: unknown key (allowed: {', '.join(sorted(_KEYS))})"
        )
    for key in ("coordinator", "ca_file", "token_file"):
        if key in table and not isinstance(table[key], str):
            raise errors.InvalidArgumentError(f"{where}: {key} must be a string")
    if "insecure" in table and not isinstance(table["insecure"], bool):
        raise errors.InvalidArgumentError(f"{where}: insecure must be true or false")

    def path_of(key: str) -> Path | None:
        value = table.get(key)
        return Path(value).expanduser() if value else None

    return Profile(
        name=name,
        coordinator=table.get("coordinator") or None,
        ca_file=path_of("ca_file"),
        token_file=path_of("token_file"),
        insecure=table.get("insecure"),
    )


def resolve(
    *,
    coordinator: str | None = None,
    token: str | None = None,
    ca_file: str | None = None,
    insecure: bool | None = None,
    profile: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Connection:
    """Explicit arguments, then JITMESH_* variables, then the profile; for the token, last,
    the one `jitctl login` saved (`token_file()`)."""
    env = os.environ if environ is None else environ
    chosen = load_profile(profile, environ=env)
    found_coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    found_token = token or env.get(ENV_TOKEN) or None
    found_ca: str | None = ca_file or None
    found_insecure = insecure
    # The transport comes as a pair: an explicit or environment choice of either half keeps
    # the profile's other half out (a CA file from the profile never meets --insecure).
    transport_given = (
        found_ca is not None
        or found_insecure is not None
        or bool(env.get(ENV_CA_FILE))
        or bool(env.get(ENV_INSECURE))
    )
    if chosen is not None:
        found_coordinator = found_coordinator or chosen.coordinator
        if found_token is None:
            found_token = chosen.token()
        if not transport_given:
            found_ca = str(chosen.ca_file) if chosen.ca_file else None
            found_insecure = chosen.insecure
    if found_token is None:
        found_token = saved_token(env)
    return Connection(
        found_coordinator, found_token, found_ca, found_insecure, chosen.name if chosen else None
    )
