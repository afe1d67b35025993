"""The agent's local socket: `STATE/agent.sock`, for `check`, `exec` and `breakglass`.

Every connection is one request. The caller is who the kernel says it is (SO_PEERCRED), mapped
to a local user name; only root may name another subject (`--subject`); everyone else asks for
themselves. Methods:

- `check {action, subject?}` -> `{ok, allowed, grant_id, not_after}`
- `info {}` -> `{ok, agent}` (the agent's name, for `exec --request`)
- `exec {action, subject?, command, argc, release, run_as?}`: the conversation of one run (see
  `agent.local.runner`): the agent answers with the grant, the caller forks the command into its
  own process group and names its pid, the agent checks that pid (the caller's child, leading
  its own group, running as the expected user), audits `exec.started`, and from then on may
  send `{end: cause}` when the grant ends; the caller reports `{exited, signal}`, the agent
  audits `exec.exited` and, with `release`, ends the grant on the host. A caller that goes away
  before reporting leaves no command behind: the agent ends its process group.
- `breakglass {code}`: handed to the handler given at construction (the break-glass code
  verification belongs to the workflow issue); without one, refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from agent.domain.leases import EventKind, Lease, OutboxEvent, new_event
from agent.local.peers import Caller, peer_of
from agent.local.protocol import MAX_LINE, SOCKET_NAME, ProtocolError, decode, encode
from agent.local.sessions import Run, Sessions, process_info
from jitmesh import validation
from jitmesh.clock import Clock

log = logging.getLogger(__name__)

# How long a caller has to name its command's pid (it forks and waits for the child first).
PID_TIMEOUT = 10.0

Message = dict[str, Any]
Handler = Callable[[Caller, Message], Awaitable[Message]]


class EngineView(Protocol):
    """What the socket needs of the engine."""

    async def allowing(self, subject: str, action: str) -> Lease | None: ...

    async def release(self, grant_id: str) -> bool: ...

    async def audit(self, event: OutboxEvent) -> None: ...


class Refused(Exception):
    """An answer of `{ok: false, error, code}`: the message says what to do, echoes nothing."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


class LocalServer:
    def __init__(
        self,
        *,
        state_dir: Path,
        name: str,
        engine: EngineView,
        sessions: Sessions,
        clock: Clock,
        breakglass: Handler | None = None,
    ) -> None:
        self.path = state_dir / SOCKET_NAME
        self._name = name
        self._engine = engine
        self._sessions = sessions
        self._clock = clock
        self._breakglass = breakglass
        self.ready = asyncio.Event()

    async def run(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            # Left by an earlier run: the state directory's lock says no other agent runs here.
            self.path.unlink()
        server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_LINE)
        # Anyone on the host may connect; who they are is the kernel's answer, per connection.
        os.chmod(self.path, 0o666)  # noqa: S103 (a socket: access is decided per caller)
        self.ready.set()
        try:
            async with server:
                await server.serve_forever()
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            caller = peer_of(writer.get_extra_info("socket"))
            request = await _read(reader, timeout=PID_TIMEOUT)
            if request is None:
                return
            method = request.get("method")
            try:
                if method == "check":
                    answer = await self._check(caller, request)
                elif method == "info":
                    answer = {"ok": True, "agent": self._name}
                elif method == "exec":
                    await self._exec(caller, request, reader, writer)
                    return
                elif method == "breakglass":
                    if self._breakglass is None:
                        raise Refused("break-glass codes are not available on this agent")
                    answer = await self._breakglass(caller, request)
                else:
                    raise Refused("unknown method", "invalid")
            except Refused as exc:
                answer = {"ok": False, "error": str(exc), "code": exc.code}
            writer.write(encode(answer))
            await writer.drain()
        except (ProtocolError, ConnectionError, TimeoutError) as exc:
            log.info("local connection dropped", extra={"error": str(exc)})
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _subject(self, caller: Caller, request: Message) -> str:
        """The subject a caller may ask about: themselves, or anyone when root."""
        named = request.get("subject")
        if named is not None and not isinstance(named, str):
            raise Refused("subject must be a string", "invalid")
        if named and named != caller.user and not caller.is_root:
            raise Refused("only root may name another subject (--subject)", "denied")
        subject = named or caller.user
        if subject is None:
            raise Refused("your uid has no user name on this host: name a --subject", "invalid")
        return _checked(validation.SUBJECT, subject, "subject")

    async def _check(self, caller: Caller, request: Message) -> Message:
        subject = self._subject(caller, request)
        action = _checked(validation.ACTION, request.get("action"), "action")
        lease = await self._engine.allowing(subject, action)
        if lease is None:
            return {"ok": True, "allowed": False, "subject": subject}
        return {
            "ok": True,
            "allowed": True,
            "subject": subject,
            "grant_id": lease.grant_id,
            "not_after": _iso(lease.not_after),
        }

    async def _exec(
        self,
        caller: Caller,
        request: Message,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        async def say(message: Message) -> None:
            writer.write(encode(message))
            await writer.drain()

        try:
            subject = self._subject(caller, request)
            action = _checked(validation.ACTION, request.get("action"), "action")
            run_as = self._run_as(caller, subject, request.get("run_as"))
            command = request.get("command")
            argc = request.get("argc")
            if not isinstance(command, str) or not isinstance(argc, int) or not 0 < argc < 4096:
                raise Refused("exec: command and argc are required", "invalid")
            lease = await self._engine.allowing(subject, action)
            if lease is None:
                raise Refused(f"no grant lets {subject} do {action} on this host now", "denied")
        except Refused as exc:
            await say({"ok": False, "error": str(exc), "code": exc.code})
            return
        release = request.get("release") is True
        run_id = f"run-{secrets.token_hex(8)}"
        await say(
            {
                "ok": True,
                "run_id": run_id,
                "grant_id": lease.grant_id,
                "not_after": _iso(lease.not_after),
                "run_as": run_as,
            }
        )
        named = await _read(reader, timeout=PID_TIMEOUT)
        pid = named.get("pid") if named else None
        problem = self._pid_problem(caller, pid, run_as)
        if problem is None:
            # The grant may have ended while the command was being prepared.
            again = await self._engine.allowing(subject, action)
            problem = None if again is not None else "the grant ended before the command started"
        if problem is not None or not isinstance(pid, int):
            await say({"ok": False, "error": problem or "no pid", "code": "refused"})
            return
        run = Run(
            run_id=run_id,
            pair=(subject, action),
            grant_id=lease.grant_id,
            pgid=pid,
            run_as=run_as,
            started_at=self._clock.now(),
            started_mono=time.monotonic(),
        )
        self._sessions.add(run)
        record = {"run_id": run_id, "command": os.path.basename(command)[:64], "argc": str(argc)}
        record |= {"run_as": run_as, "pid": str(pid), "by": caller.user or str(caller.uid)}
        await self._engine.audit(
            new_event(EventKind.EXEC_STARTED, at=run.started_at, lease=lease, details=record)
        )
        await say({"started": True})
        exited: Message | None = None
        try:
            exited = await self._supervise(run, reader, say)
        finally:
            if exited is None and run.cause is None:
                # The caller went away with the command still running: never unsupervised.
                await self._sessions.end_run(run, "supervisor_lost")
            self._sessions.discard(run_id)
            released = False
            if exited is not None and release:
                released = await self._engine.release(lease.grant_id)
            code = exited.get("exited") if exited else None
            signal_name = exited.get("signal") if exited else None
            duration_ms = int((time.monotonic() - run.started_mono) * 1000)
            details = record | {
                "exit_code": str(code if isinstance(code, int) else -1),
                "signal": signal_name if isinstance(signal_name, str) else "",
                "duration_ms": str(duration_ms),
                "cause": run.cause or "exited",
                "released": str(released).lower(),
            }
            await self._engine.audit(
                new_event(EventKind.EXEC_EXITED, at=self._clock.now(), lease=lease, details=details)
            )
            if exited is not None:
                with contextlib.suppress(ConnectionError):
                    await say({"done": True, "released": released, "cause": run.cause or ""})

    async def _supervise(
        self,
        run: Run,
        reader: asyncio.StreamReader,
        say: Callable[[Message], Awaitable[None]],
    ) -> Message | None:
        """Until the caller reports the exit (its message) or goes away (None); tells it when
        the agent ends the run."""
        told = False
        reading = asyncio.ensure_future(_read(reader, timeout=None))
        try:
            while True:
                ending = asyncio.ensure_future(run.ending.wait())
                done, _ = await asyncio.wait({reading, ending}, return_when=asyncio.FIRST_COMPLETED)
                ending.cancel()
                if reading in done:
                    return reading.result()
                if not told:
                    told = True
                    with contextlib.suppress(ConnectionError):
                        await say({"end": run.cause or "ended", "grace": self._sessions.grace})
        except (ProtocolError, ConnectionError):
            return None
        finally:
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading

    def _run_as(self, caller: Caller, subject: str, asked: object) -> str:
        """Root runs the command as the subject's user (or as root when asked); anyone else as
        themselves."""
        if not caller.is_root:
            assert caller.user is not None  # _subject refused a caller without a name
            return caller.user
        if asked == "root":
            return "root"
        try:
            pwd.getpwnam(subject)
        except KeyError:
            raise Refused(
                f"{subject} is not a user on this host: run as root with --run-as-root",
                "invalid",
            ) from None
        return subject

    @staticmethod
    def _pid_problem(caller: Caller, pid: object, run_as: str) -> str | None:
        if not isinstance(pid, int) or pid <= 1:
            return "exec: the command's pid is missing"
        info = process_info(pid)
        if info is None:
            return "exec: the command is not running"
        parent, group, uid = info
        if parent != caller.pid:
            return "exec: the pid is not the caller's child"
        if group != pid:
            return "exec: the command does not lead its own process group"
        if uid != pwd.getpwnam(run_as).pw_uid:
            return "exec: the command does not run as the expected user"
        return None


async def _read(reader: asyncio.StreamReader, *, timeout: float | None) -> Message | None:  # noqa: ASYNC109
    """One message; None at end of stream."""
    try:
        async with asyncio.timeout(timeout):
            line = await reader.readline()
    except ValueError:
        raise ProtocolError("message too long") from None
    if not line:
        return None
    return decode(line)


def _checked(pattern: Any, value: object, what: str) -> str:
    if not isinstance(value, str):
        raise Refused(f"{what} is required", "invalid")
    try:
        return validation.check(pattern, value, what)
    except validation.ValidationError as exc:
        raise Refused(str(exc), "invalid") from None


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
