"""The `ssh` enforcer: the subject's public keys in an authorized-keys file that jitmesh manages,
each with OpenSSH's `expiry-time`, so sshd refuses the key after the grant on its own.

The host's administrator registers each person's public keys (`keys` directory: `alice.pub`,
one key per line, no options). While a grant for one of the configured actions holds, the keys
are written to `directory/<subject>` (root's, 0644, written beside it and renamed into place),
every line prefixed with `expiry-time="YYYYMMDDHHMMSSZ"`: the last whole second before the latest
`not_after` among the subject's live SSH grants (sshd compares whole seconds, in UTC with the
`Z`). sshd reads the file through `AuthorizedKeysFile` in sshd_config, beside the user's own:

    AuthorizedKeysFile .ssh/authorized_keys /etc/ssh/jitmesh_keys/%u

Logged-in sessions outlive a key's expiry: `--end-sessions user` ends them with the last grant.
A file changed by hand (digest in its first line) is removed when the enforcer next looks.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.domain.coverage import Cover
from agent.domain.errors import EnforcerError
from agent.domain.leases import Pair
from jitmesh import validation

log = logging.getLogger(__name__)

HEADER = "# jitmesh-agent authorized keys: changes by hand are undone."
KEY = re.compile(
    r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|"
    r"sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/=]{16,16384}( [^\"\n\r]{0,200})?"
)
_ENTRY = re.compile(r"# action=(\S+) grant=(\S+) not_before=(\S+) not_after=(\S+)")


@dataclass(frozen=True, slots=True)
class SshSettings:
    keys: Path
    actions: frozenset[str] = frozenset({"ssh"})
    directory: Path = Path("/etc/ssh/jitmesh_keys")


class SshEnforcer:
    def __init__(self, settings: SshSettings, *, name: str = "ssh") -> None:
        self._settings = settings
        self._name = name
        # The windows in force, per subject and action (rebuilt from the files by `observe`).
        self._held: dict[str, dict[str, Cover]] = {}

    @property
    def name(self) -> str:
        return self._name

    def path_for(self, subject: str) -> Path:
        return self._settings.directory / subject

    async def apply(self, cover: Cover) -> None:
        if cover.action not in self._settings.actions:
            return
        _checked(cover.subject)
        held = self._held.setdefault(cover.subject, {})
        before = held.get(cover.action)
        held[cover.action] = cover
        try:
            self._write(cover.subject)
        except EnforcerError:
            if before is None:
                held.pop(cover.action, None)
            else:
                held[cover.action] = before
            raise

    async def extend(self, cover: Cover) -> None:
        if cover.action in self._held.get(cover.subject, {}):
            await self.apply(cover)

    async def remove(self, subject: str, action: str) -> None:
        held = self._held.get(subject, {})
        held.pop(action, None)
        if held:
            self._write(subject)
            return
        self._held.pop(subject, None)
        try:
            self.path_for(_checked(subject)).unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise EnforcerError(f"ssh enforcer: cannot remove keys ({exc.strerror})") from None

    async def observe(self) -> set[Pair]:
        directory = self._settings.directory
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise EnforcerError(f"ssh enforcer: cannot list keys ({exc.strerror})") from None
        found: set[Pair] = set()
        for name in names:
            if name.startswith("."):
                continue
            covers = _intact(directory / name)
            if covers is None:
                log.warning("authorized keys changed by hand: removed", extra={"file": name})
                with contextlib.suppress(FileNotFoundError):
                    (directory / name).unlink()
                continue
            self._held[name] = {cover.action: cover for cover in covers}
            found |= {cover.pair for cover in covers}
        return found

    def _write(self, subject: str) -> None:
        held = self._held.get(subject, {})
        keys = self._keys(subject)
        latest = max(cover.not_after for cover in held.values())
        # sshd accepts a key through the second its expiry-time names: the one before not_after.
        stamp = (latest.replace(microsecond=0) - timedelta(seconds=1)).astimezone(UTC)
        expiry = stamp.strftime("%Y%m%d%H%M%SZ")
        lines = [
            f"# action={c.action} grant={c.grant_id} not_before={_iso(c.not_before)} "
            f"not_after={_iso(c.not_after)}"
            for c in sorted(held.values(), key=lambda c: c.action)
        ]
        lines += [f'expiry-time="{expiry}" {key}' for key in keys]
        body = "\n".join(lines) + "\n"
        text = f"{HEADER} sha256={hashlib.sha256(body.encode()).hexdigest()}\n{body}"
        directory = self._settings.directory
        final = self.path_for(subject)
        tmp = directory / f".{subject}.{secrets.token_hex(4)}.tmp"
        try:
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, text.encode())
                # sshd (StrictModes) wants it owned by root or the user, not writable by others.
                os.fchmod(fd, 0o644)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise EnforcerError(f"ssh enforcer: cannot write keys ({exc.strerror})") from None

    def _keys(self, subject: str) -> list[str]:
        path = self._settings.keys / f"{subject}.pub"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise EnforcerError(
                f"ssh enforcer: no public key registered for {subject} (keys directory)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise EnforcerError(f"ssh enforcer: cannot read {subject}'s keys ({exc})") from None
        keys = [line.strip() for line in text.splitlines() if line.strip()]
        keys = [key for key in keys if not key.startswith("#")]
        if not keys or not all(KEY.fullmatch(key) for key in keys):
            raise EnforcerError(
                f"ssh enforcer: {subject}'s registered keys must be plain public keys, one a line"
            )
        return keys


def _intact(path: Path) -> list[Cover] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    first, sep, body = text.partition("\n")
    if not sep or first != f"{HEADER} sha256={hashlib.sha256(body.encode()).hexdigest()}":
        return None
    covers = []
    for line in body.splitlines():
        match = _ENTRY.fullmatch(line)
        if match:
            action, grant, not_before, not_after = match.groups()
            covers.append(
                Cover(
                    path.name,
                    action,
                    grant,
                    datetime.fromisoformat(not_before),
                    datetime.fromisoformat(not_after),
                )
            )
    return covers or None


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat()


def _checked(subject: str) -> str:
    if not validation.SUBJECT.fullmatch(subject):
        raise EnforcerError("ssh enforcer: subject is not valid")
    return subject


def settings_from(raw: Mapping[str, object]) -> SshSettings:
    """`[enforcers.ssh]` from the agent's TOML configuration."""
    unknown = set(raw) - {"keys", "actions", "directory", "drift"}
    if unknown:
        raise ValueError("unknown keys (allowed: keys, actions, directory, drift)")
    keys, directory = raw.get("keys"), raw.get("directory", "/etc/ssh/jitmesh_keys")
    if not isinstance(keys, str) or not keys.startswith("/"):
        raise ValueError("keys: the absolute path of the directory of registered public keys")
    if not isinstance(directory, str) or not directory.startswith("/"):
        raise ValueError("directory: must be an absolute path")
    actions = raw.get("actions", ["ssh"])
    if (
        not isinstance(actions, list)
        or not actions
        or not all(isinstance(a, str) and validation.ACTION.fullmatch(a) for a in actions)
    ):
        raise ValueError("actions: must be a list of action names")
    return SshSettings(Path(keys), frozenset(actions), Path(directory))
