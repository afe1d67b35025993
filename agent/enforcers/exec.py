"""The `exec` enforcer: runs configured argv hooks to apply, remove and observe access.

Never a shell: each argv element gets `{subject}` and `{action}` substituted (values already
checked against the shared SUBJECT and ACTION shapes) and the result is executed directly. The
environment is fixed (nothing is inherited from the agent: no LD_PRELOAD, no secrets of the
agent's own environment). Each hook runs in its own session with a timeout; on timeout or
cancellation its whole process group is killed. What a hook leaves running after it exits
normally is its own business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import IO

from agent.domain.coverage import Cover
from agent.domain.errors import EnforcerError, HookFailed, HookTimeout
from agent.domain.leases import Pair
from jitmesh import validation

log = logging.getLogger(__name__)

FIXED_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
TAIL_CHARS = 160
TAIL_BYTES = 4096
# What observe output is read at most (one short line per pair in force).
MAX_OUTPUT = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Hooks:
    apply: tuple[str, ...]
    remove: tuple[str, ...]
    observe: tuple[str, ...] | None = None
    timeout: timedelta = timedelta(seconds=10)
    env: Mapping[str, str] = field(default_factory=dict)


class ExecEnforcer:
    def __init__(self, hooks: Hooks, *, name: str = "exec") -> None:
        self._hooks = hooks
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    async def apply(self, cover: Cover) -> None:
        await self._run("apply", self._hooks.apply, cover.pair)

    async def extend(self, cover: Cover) -> None:
        """Hooks have no deadline to move (the agent's own expiry removes the pair on time)."""

    async def remove(self, subject: str, action: str) -> None:
        await self._run("remove", self._hooks.remove, (subject, action))

    async def observe(self) -> set[Pair]:
        """Pairs the observe hook prints, one `subject action` per line.

        Without an observe hook nothing can be seen: the start-up reconcile then applies every
        pair the table holds again (apply is idempotent) and cannot find access it did not grant.
        """
        if self._hooks.observe is None:
            return set()
        out = await self._run("observe", self._hooks.observe, None)
        found: set[Pair] = set()
        skipped = 0
        for line in out.decode("utf-8", "replace").splitlines():
            parts = line.split()
            if not parts:
                continue
            if (
                len(parts) == 2
                and validation.SUBJECT.fullmatch(parts[0])
                and validation.ACTION.fullmatch(parts[1])
            ):
                found.add((parts[0], parts[1]))
            else:
                skipped += 1
        if skipped:
            log.warning(
                "observe hook printed lines that are not pairs",
                extra={"enforcer": self._name, "count": skipped},
            )
        return found

    async def _run(self, phase: str, template: tuple[str, ...], pair: Pair | None) -> bytes:
        env = {**FIXED_ENV, **self._hooks.env}
        argv = list(template)
        if pair is not None:
            subject, action = _checked(pair)
            argv = [a.replace("{subject}", subject).replace("{action}", action) for a in argv]
            env["JITMESH_SUBJECT"] = subject
            env["JITMESH_ACTION"] = action
        # Output goes to unlinked temporary files, not pipes: a process the hook leaves behind
        # cannot hold a pipe open and keep the agent waiting for end-of-file.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = await self._spawn(phase, argv, env, out, err)
            try:
                async with asyncio.timeout(self._hooks.timeout.total_seconds()):
                    await proc.wait()
            except TimeoutError:
                await _kill_group(proc)
                raise HookTimeout(
                    f"{self._name} enforcer: {phase} hook timed out after "
                    f"{self._hooks.timeout.total_seconds():g}s and was killed"
                ) from None
            except BaseException:
                # Cancelled (the agent is stopping): leave no hook behind.
                await _kill_group(proc)
                raise
            stdout = _head(out, MAX_OUTPUT)
            stderr = _tail(err, TAIL_BYTES)
        if proc.returncode != 0:
            raise HookFailed(
                f"{self._name} enforcer: {phase} hook exited with code {proc.returncode}",
                exit_code=proc.returncode if proc.returncode is not None else -1,
                tail=self._redacted(stderr),
            )
        return stdout

    async def _spawn(
        self, phase: str, argv: list[str], env: dict[str, str], out: IO[bytes], err: IO[bytes]
    ) -> asyncio.subprocess.Process:
        starting = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        )
        try:
            return await asyncio.shield(starting)
        except asyncio.CancelledError:
            # Cancelled while the hook was starting. asyncio would kill the hook alone, not what
            # it already started: let the start finish, then kill the whole group.
            with contextlib.suppress(OSError):
                await _kill_group(await starting)
            raise
        except OSError as exc:
            raise EnforcerError(
                f"{self._name} enforcer: {phase} hook could not start ({exc.strerror})"
            ) from None

    def _redacted(self, stderr: bytes) -> str:
        text = stderr.decode("utf-8", "replace")
        # Configured values may be secrets (tokens for the hook): never pass them on.
        for value in self._hooks.env.values():
            if len(value) >= 4:
                text = text.replace(value, "***")
        text = "".join(c if c.isprintable() else " " for c in text).strip()
        return text[-TAIL_CHARS:]


def _checked(pair: Pair) -> Pair:
    try:
        validation.check(validation.SUBJECT, pair[0], "subject")
        validation.check(validation.ACTION, pair[1], "action")
    except validation.ValidationError as exc:
        raise EnforcerError(f"exec enforcer: {exc}") from None
    return pair


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # The hook leads its own session, so its process group id is its pid; killing the group
    # takes any children it started with it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


def _head(file: IO[bytes], limit: int) -> bytes:
    file.seek(0)
    return file.read(limit)


def _tail(file: IO[bytes], limit: int) -> bytes:
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - limit))
    return file.read(limit)
