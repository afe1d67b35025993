"""The `group` enforcer: membership of unix groups per action (`gpasswd -a` / `gpasswd -d`).

An action maps to groups (`[enforcers.group.actions]`, e.g. `deploy = ["docker"]`). Grants are
counted per pair by the engine; a group shared by two actions of the same subject is kept while
any pair in force needs it (this enforcer knows which pairs it put in force).

Groups have no expiry of their own: a membership lasts until it is removed, so this enforcer is
only as punctual as the agent (unlike sudo and ssh, the host cannot refuse on its own), and
processes that are already running keep the groups they started with after the removal (end
them with `--end-sessions user` where that matters, or give access through `exec`).

Drift: `observe` reports a pair for every member of all of an action's groups, so a member added
by hand is found by the reconcile and removed (or, with `drift=report`, audited). Use only groups
that jitmesh alone manages, or `drift=report` for groups with permanent members.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from agent.domain.coverage import Cover
from agent.domain.errors import EnforcerError
from agent.domain.leases import Pair
from jitmesh import validation

log = logging.getLogger(__name__)

GROUP = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class GroupSettings:
    actions: Mapping[str, tuple[str, ...]]
    gpasswd: str = "gpasswd"


class GroupEnforcer:
    def __init__(self, settings: GroupSettings, *, name: str = "group") -> None:
        self._settings = settings
        self._name = name
        # Pairs this enforcer put in force (a shared group stays while one of them needs it).
        self._held: set[Pair] = set()

    @property
    def name(self) -> str:
        return self._name

    async def apply(self, cover: Cover) -> None:
        groups = self._settings.actions.get(cover.action, ())
        subject = _checked(cover.subject)
        for group in groups:
            if subject not in _members(group):
                await self._gpasswd("-a", subject, group)
        if groups:
            self._held.add(cover.pair)

    async def extend(self, cover: Cover) -> None:
        """A membership has no deadline to move."""

    async def remove(self, subject: str, action: str) -> None:
        self._held.discard((subject, action))
        still = {
            group
            for held_subject, held_action in self._held
            if held_subject == subject
            for group in self._settings.actions.get(held_action, ())
        }
        for group in self._settings.actions.get(action, ()):
            if group in still or subject not in _members(group):
                continue
            await self._gpasswd("-d", _checked(subject), group)

    async def observe(self) -> set[Pair]:
        found: set[Pair] = set()
        try:
            members = {
                group: _members(group)
                for groups in self._settings.actions.values()
                for group in groups
            }
        except KeyError as exc:
            raise EnforcerError(f"group enforcer: no such group {exc.args[0]}") from None
        for action, groups in self._settings.actions.items():
            if not groups:
                continue
            common = set.intersection(*(members[g] for g in groups))
            found |= {(user, action) for user in common if validation.SUBJECT.fullmatch(user)}
        # After a restart: what is on the host counts as put in force by us (the reconcile
        # removes what no lease holds).
        self._held |= found
        return found

    async def _gpasswd(self, flag: str, user: str, group: str) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                self._settings.gpasswd,
                flag,
                user,
                group,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
            )
        except OSError as exc:
            raise EnforcerError(f"group enforcer: cannot run gpasswd ({exc.strerror})") from None
        try:
            async with asyncio.timeout(TIMEOUT):
                _, err = await proc.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            raise EnforcerError(f"group enforcer: gpasswd {flag} failed: {last[0][:200]}")
        log.info(
            "group membership changed",
            extra={"subject": user, "group": group, "change": "add" if flag == "-a" else "remove"},
        )


def _members(group: str) -> set[str]:
    """Listed members (supplementary); a user whose primary group it is does not count."""
    return set(grp.getgrnam(group).gr_mem)


def _checked(subject: str) -> str:
    if not validation.SUBJECT.fullmatch(subject) or subject.startswith("-"):
        raise EnforcerError("group enforcer: subject is not valid")
    return subject


def settings_from(raw: Mapping[str, object]) -> GroupSettings:
    """`[enforcers.group]` from the agent's TOML configuration."""
    unknown = set(raw) - {"actions", "gpasswd", "drift"}
    if unknown:
        raise ValueError("unknown keys (allowed: actions, gpasswd, drift)")
    actions = raw.get("actions", {})
    if not isinstance(actions, Mapping):
        raise ValueError("actions: must be a table of action = [groups]")
    parsed: dict[str, tuple[str, ...]] = {}
    for action, groups in actions.items():
        if not isinstance(action, str) or not validation.ACTION.fullmatch(action):
            raise ValueError("actions: action names are lower-case letters, digits and ._-")
        if (
            not isinstance(groups, list)
            or not groups
            or not all(isinstance(g, str) and GROUP.fullmatch(g) for g in groups)
        ):
            raise ValueError(f"actions.{action}: must be a list of group names")
        parsed[action] = tuple(groups)
    gpasswd = raw.get("gpasswd", "gpasswd")
    if not isinstance(gpasswd, str) or not gpasswd:
        raise ValueError("gpasswd: must be a program name or path")
    return GroupSettings(parsed, gpasswd)
