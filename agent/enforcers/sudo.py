"""The `sudo` enforcer: one sudoers drop-in per (subject, action), with the host's own deadline.

An action maps to a command bundle (agent configuration, `[enforcers.sudo.actions]`). A pair in
force is one file `jitmesh_<subject>__<action>` in the drop-in directory (`/etc/sudoers.d`),
written to a temporary name that sudo ignores (it contains a dot), checked with `visudo -cf`,
made 0440 and renamed into place. Every rule carries `NOTBEFORE` and `NOTAFTER` in UTC with the
`Z` suffix (without it sudo reads the time in the calling user's `TZ`), so sudo itself refuses the
rule after the grant's deadline even when the agent is not running. `NOTAFTER` follows the latest
`not_after` of the live grants covering the pair: the last whole second before it (sudo allows a
rule through the second it names), so the host never allows longer than the grant, and at most
one second less.

The file's first line carries a digest of the rest: a drop-in edited by hand (or a file under a
managed name that jitmesh did not write) is taken away when the enforcer next looks, and the
reconcile writes it again if a grant still holds the pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.domain.coverage import Cover
from agent.domain.errors import EnforcerError
from agent.domain.leases import Pair
from jitmesh import validation

log = logging.getLogger(__name__)

PREFIX = "jitmesh_"
HEADER = "# jitmesh-agent drop-in: changes by hand are undone."
VISUDO_TIMEOUT = 30.0
# A sudoers user or run-as name: no quoting games, no aliases, no %group or #uid.
RUN_AS = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}|ALL")
# Characters sudoers wants escaped inside a command's arguments.
_SUDOERS_SPECIAL = re.compile(r"([\\,:=])")


@dataclass(frozen=True, slots=True)
class Bundle:
    """The commands one action allows, as whom, and whether a password is asked."""

    commands: tuple[str, ...]
    run_as: str = "root"
    nopasswd: bool = True


@dataclass(frozen=True, slots=True)
class SudoSettings:
    actions: Mapping[str, Bundle]
    directory: Path = Path("/etc/sudoers.d")
    visudo: str = "visudo"


class SudoEnforcer:
    def __init__(self, settings: SudoSettings, *, name: str = "sudo") -> None:
        self._settings = settings
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    @property
    def directory(self) -> Path:
        return self._settings.directory

    async def apply(self, cover: Cover) -> None:
        bundle = self._settings.actions.get(cover.action)
        if bundle is None:
            # Another enforcer may give this action its meaning; sudo has nothing to add.
            log.info("no sudo commands for this action", extra={"action": cover.action})
            return
        await self._write(cover, bundle)

    async def extend(self, cover: Cover) -> None:
        bundle = self._settings.actions.get(cover.action)
        if bundle is not None:
            await self._write(cover, bundle)

    async def remove(self, subject: str, action: str) -> None:
        path = self.path_for(subject, action)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise EnforcerError(f"sudo enforcer: cannot remove drop-in ({exc.strerror})") from None

    async def observe(self) -> set[Pair]:
        """Pairs whose drop-in is intact. A managed file that jitmesh did not write as it stands
        is removed here (logged): never left in force."""
        try:
            names = [n for n in os.listdir(self.directory) if n.startswith(PREFIX)]
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise EnforcerError(f"sudo enforcer: cannot list drop-ins ({exc.strerror})") from None
        found: set[Pair] = set()
        for name in sorted(names):
            path = self.directory / name
            pair = _intact(path)
            if pair is not None and self.path_for(*pair) == path:
                found.add(pair)
                continue
            log.warning(
                "sudo drop-in changed by hand: removed",
                extra={"enforcer": self._name, "file": name},
            )
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise EnforcerError(
                    f"sudo enforcer: cannot remove a changed drop-in ({exc.strerror})"
                ) from None
        return found

    def path_for(self, subject: str, action: str) -> Path:
        return self.directory / f"{PREFIX}{_encode(subject)}__{_encode(action)}"

    async def _write(self, cover: Cover, bundle: Bundle) -> None:
        try:
            validation.check(validation.SUBJECT, cover.subject, "subject")
            validation.check(validation.ACTION, cover.action, "action")
        except validation.ValidationError as exc:
            raise EnforcerError(f"sudo enforcer: {exc}") from None
        text = render(cover, bundle)
        final = self.path_for(cover.subject, cover.action)
        # A name with a dot: sudo's @includedir skips it while it is being written and checked.
        tmp = self.directory / f".{final.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, text.encode())
                os.fchmod(fd, 0o440)
                os.fsync(fd)
            finally:
                os.close(fd)
            await self._check(tmp)
            os.replace(tmp, final)
        except OSError as exc:
            _discard(tmp)
            raise EnforcerError(f"sudo enforcer: cannot write drop-in ({exc.strerror})") from None
        except BaseException:
            _discard(tmp)
            raise

    async def _check(self, path: Path) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                self._settings.visudo,
                "-cf",
                str(path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
            )
        except OSError as exc:
            raise EnforcerError(f"sudo enforcer: cannot run visudo ({exc.strerror})") from None
        try:
            async with asyncio.timeout(VISUDO_TIMEOUT):
                _, err = await proc.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            detail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            raise EnforcerError(f"sudo enforcer: visudo refused the drop-in: {detail[0][:200]}")


def render(cover: Cover, bundle: Bundle) -> str:
    """The drop-in for `cover`: one rule per command, each with the window, then a digest."""
    # sudo allows a rule through the whole second NOTAFTER names (it compares whole seconds):
    # the second before not_after's, so the host never allows past not_after (at most 1 s less).
    last = cover.not_after.replace(microsecond=0) - timedelta(seconds=1)
    window = f"NOTBEFORE={_stamp(cover.not_before)} NOTAFTER={_stamp(last)}"
    tag = "NOPASSWD: " if bundle.nopasswd else ""
    lines = [
        f"# subject={cover.subject} action={cover.action} grant={cover.grant_id}",
        f"# not_after={cover.not_after.astimezone(UTC).isoformat()}",
    ]
    for command in bundle.commands:
        lines.append(f'"{cover.subject}" ALL = ({bundle.run_as}) {window} {tag}{_command(command)}')
    body = "\n".join(lines) + "\n"
    digest = hashlib.sha256(body.encode()).hexdigest()
    return f"{HEADER} sha256={digest}\n{body}"


def _intact(path: Path) -> Pair | None:
    """The pair a managed drop-in is for, if its digest matches what follows it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    first, sep, body = text.partition("\n")
    if not sep or not first.startswith(f"{HEADER} sha256="):
        return None
    if first.removeprefix(f"{HEADER} sha256=") != hashlib.sha256(body.encode()).hexdigest():
        return None
    match = re.match(r"# subject=(\S+) action=(\S+) grant=", body)
    if match is None:
        return None
    return match.group(1), match.group(2)


def _stamp(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y%m%d%H%M%SZ")


def _command(command: str) -> str:
    path, _, args = command.partition(" ")
    escaped = _SUDOERS_SPECIAL.sub(r"\\\1", args)
    return path if not args else f"{path} {escaped}"


def _encode(text: str) -> str:
    # Letters, digits and '-' stay; everything else (sudo skips names with a dot) becomes _xx.
    return "".join(c if _plain(c) else f"_{ord(c):02x}" for c in text)


def _plain(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "-")


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def parse_bundles(raw: object) -> dict[str, Bundle]:
    """`[enforcers.sudo.actions]`: each action is a list of commands, or a table with
    `commands`, `run_as` (default root) and `nopasswd` (default true). Raises ValueError with a
    message that names the action but never echoes a command."""
    if not isinstance(raw, Mapping):
        raise ValueError("actions: must be a table of action = [commands]")
    bundles: dict[str, Bundle] = {}
    for action, spec in raw.items():
        if not isinstance(action, str) or not validation.ACTION.fullmatch(action):
            raise ValueError("actions: action names are lower-case letters, digits and ._-")
        if isinstance(spec, list):
            spec = {"commands": spec}
        if not isinstance(spec, Mapping):
            raise ValueError(f"actions.{action}: must be a list of commands or a table")
        unknown = set(spec) - {"commands", "run_as", "nopasswd"}
        if unknown:
            raise ValueError(
                f"actions.{action}: unknown keys (allowed: commands, run_as, nopasswd)"
            )
        commands = spec.get("commands")
        if not isinstance(commands, list) or not commands or len(commands) > 64:
            raise ValueError(f"actions.{action}.commands: must be a list of 1 to 64 commands")
        for command in commands:
            _check_command(command, action)
        run_as = spec.get("run_as", "root")
        if not isinstance(run_as, str) or not RUN_AS.fullmatch(run_as):
            raise ValueError(f"actions.{action}.run_as: must be a user name (or ALL)")
        nopasswd = spec.get("nopasswd", True)
        if not isinstance(nopasswd, bool):
            raise ValueError(f"actions.{action}.nopasswd: must be true or false")
        bundles[action] = Bundle(tuple(commands), run_as, nopasswd)
    return bundles


def _check_command(command: object, action: str) -> None:
    where = f"actions.{action}.commands"
    if not isinstance(command, str) or not command.startswith("/"):
        raise ValueError(f"{where}: each command must start with its absolute path")
    # `PATH ""` is sudoers' "without arguments"; no other quotes.
    unquoted = command.removesuffix(' ""')
    if any(c in unquoted for c in '\n\r\0"') or len(command) > 1024:
        raise ValueError(f"{where}: commands must be one line, without quotes, up to 1024 chars")
    path = command.partition(" ")[0]
    if _SUDOERS_SPECIAL.search(path) or not re.fullmatch(r"/[A-Za-z0-9._/+-]+", path):
        raise ValueError(f"{where}: the program path has characters sudoers cannot take")


def settings_from(raw: Mapping[str, object]) -> SudoSettings:
    """`[enforcers.sudo]` from the agent's TOML configuration."""
    unknown = set(raw) - {"actions", "directory", "visudo", "drift"}
    if unknown:
        raise ValueError("unknown keys (allowed: actions, directory, visudo, drift)")
    directory = raw.get("directory", "/etc/sudoers.d")
    visudo = raw.get("visudo", "visudo")
    if not isinstance(directory, str) or not directory.startswith("/"):
        raise ValueError("directory: must be an absolute path")
    if not isinstance(visudo, str) or not visudo:
        raise ValueError("visudo: must be a program name or path")
    return SudoSettings(parse_bundles(raw.get("actions", {})), Path(directory), visudo)


__all__: Sequence[str] = ["Bundle", "SudoEnforcer", "SudoSettings", "parse_bundles", "render"]
