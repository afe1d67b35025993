"""`jitmesh-agent exec`: run a command only while a grant allows it.

The command runs as a child of this process, in its own process group, as the subject's user
when started by root (as the caller otherwise). The agent is told its pid and watches it: when
the grant is revoked, expires or is locked, the agent (and this process) end the group with
SIGTERM, then SIGKILL after the grace period. The exit code is passed through (128+N for signal
N). With `--release` the grant is ended on the host when the command ends, and released on the
coordinator with the caller's own credentials when they are at hand (JITMESH_COORDINATOR,
JITMESH_TOKEN, and JITMESH_CA_FILE or JITMESH_INSECURE as the SDK reads them: the subject's,
never the agent's). `--request` files the request
with those same credentials first and waits for it to be approved and applied here.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import select
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from agent.local.client import Connection, Unreachable, ask

EXIT_DENIED = 1
EXIT_USAGE = 2
# The command could not be started (as a shell says: 126 not executable, 127 not found).
EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127
WAIT_APPLIED = 60.0


@dataclass(frozen=True, slots=True)
class ExecOptions:
    state_dir: Path
    subject: str | None
    action: str
    argv: Sequence[str]
    release: bool = False
    run_as_root: bool = False
    grace: float = 10.0
    request_duration: timedelta | None = None
    request_reason: str = ""


class ExecFailed(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def run(options: ExecOptions) -> int:
    """The command's exit code (or ours: 1 denied, 2 usage or agent unreachable)."""
    try:
        if options.request_duration is not None:
            _request(options)
        return _run(options)
    except ExecFailed as exc:
        print(f"jitmesh-agent exec: {exc}", file=sys.stderr)
        return exc.code
    except Unreachable as exc:
        print(f"jitmesh-agent exec: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run(options: ExecOptions) -> int:
    argv = list(options.argv)
    with Connection.open(options.state_dir, timeout=None) as agent:
        agent.send(
            {
                "method": "exec",
                "subject": options.subject,
                "action": options.action,
                "command": argv[0],
                "argc": len(argv),
                "release": options.release,
                "run_as": "root" if options.run_as_root else None,
            }
        )
        granted = agent.receive()
        if granted is None:
            raise ExecFailed("the agent closed the connection")
        if not granted.get("ok"):
            code = EXIT_DENIED if granted.get("code") == "denied" else EXIT_USAGE
            raise ExecFailed(str(granted.get("error", "refused")), code)
        child = _spawn(argv, str(granted["run_as"]))
        agent.send({"pid": child.pid})
        started = agent.receive()
        if not started or not started.get("started"):
            child.abandon()
            reason = started.get("error", "refused") if started else "no answer"
            raise ExecFailed(f"not started: {reason}", EXIT_DENIED)
        child.go()
        status, cause = _supervise(agent, child, options.grace)
        code, signal_name = _exit_code(status)
        agent.send({"exited": code, "signal": signal_name})
        done: dict[str, Any] = {}
        while (message := agent.receive()) is not None:
            # An `end` the agent sent while the command was already exiting comes first.
            cause = cause or str(message.get("end") or message.get("cause") or "")
            if message.get("done"):
                done = message
                break
    if cause:
        print(f"jitmesh-agent exec: access ended ({cause}): the command was ended", file=sys.stderr)
    if options.release:
        _release_upstream(str(granted["grant_id"]), bool(done.get("released")))
    return code


@dataclass
class _Child:
    pid: int
    go_fd: int
    tty: int | None

    def go(self) -> None:
        os.write(self.go_fd, b"g")
        os.close(self.go_fd)

    def abandon(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.go_fd)  # the child sees end of file and exits without running
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _spawn(argv: list[str], run_as: str) -> _Child:
    """Fork the command, stopped before exec until `go()`: in its own process group, as
    `run_as` when that is not who we are (root only)."""
    user = pwd.getpwnam(run_as)
    switch = os.geteuid() != user.pw_uid
    if switch and os.geteuid() != 0:
        raise ExecFailed("only root can run a command as another user")
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    tty = _terminal()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(ready_r)
            os.close(go_w)
            os.setpgid(0, 0)
            env = dict(os.environ)
            if switch:
                os.initgroups(user.pw_name, user.pw_gid)
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)
                env |= {"HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name}
                # Never carry the caller's coordinator token into another user's command.
                env.pop("JITMESH_TOKEN", None)
            os.write(ready_w, b"r")
            os.close(ready_w)
            if os.read(go_r, 1) != b"g":
                os._exit(EXIT_CANNOT_RUN)
            os.close(go_r)
            for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTOU):
                signal.signal(sig, signal.SIG_DFL)
            os.execvpe(argv[0], argv, env)  # noqa: S606 (argv as given, never a shell)
        except FileNotFoundError:
            os._exit(EXIT_NOT_FOUND)
        except BaseException:
            os._exit(EXIT_CANNOT_RUN)
    os.close(ready_w)
    os.close(go_r)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)  # also here: whichever runs first, the group exists before exec
    ready = os.read(ready_r, 1)
    os.close(ready_r)
    if ready != b"r":
        os.waitpid(pid, 0)
        raise ExecFailed("cannot prepare the command (user switch failed)", EXIT_CANNOT_RUN)
    if tty is not None:
        # The command is the terminal's foreground job (keys such as Ctrl-C go to it).
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        with contextlib.suppress(OSError):
            os.tcsetpgrp(tty, pid)
    return _Child(pid, go_w, tty)


def _terminal() -> int | None:
    try:
        return sys.stdin.fileno() if os.isatty(sys.stdin.fileno()) else None
    except (OSError, ValueError):
        return None


def _supervise(agent: Connection, child: _Child, grace: float) -> tuple[int, str]:
    """Wait for the command; end its group when the agent says the grant ended. Returns the
    wait status and the agent's cause ('' when the command ended by itself)."""
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)  # they are for the command, not for us

    def forward(signum: int, _: Any) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGHUP, forward)
    pidfd = os.pidfd_open(child.pid)
    cause = ""
    kill_at: float | None = None
    try:
        while True:
            timeout = None if kill_at is None else max(0.0, kill_at - time.monotonic())
            waiting: list[Any] = [pidfd, agent.sock]
            readable, _, _ = select.select(waiting, [], [], timeout)
            if pidfd in readable:
                _, status = os.waitpid(child.pid, 0)
                return status, cause
            if agent.sock in readable:
                message = agent.receive()
                if message is None:
                    # The agent went away: no supervision, no command.
                    cause = cause or "agent_gone"
                    message = {"end": cause}
                if "end" in message and kill_at is None:
                    cause = str(message["end"])
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(child.pid, signal.SIGTERM)
                    kill_at = time.monotonic() + grace
            if kill_at is not None and time.monotonic() >= kill_at:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.pid, signal.SIGKILL)
                kill_at = float("inf")
    finally:
        os.close(pidfd)
        if child.tty is not None:
            with contextlib.suppress(OSError):
                os.tcsetpgrp(child.tty, os.getpgrp())


def _exit_code(status: int) -> tuple[int, str]:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return 128 + number, signal.Signals(number).name
    return os.waitstatus_to_exitcode(status), ""


# With the caller's own credentials (heavy imports only here).


def _credentials() -> tuple[str, str] | None:
    """The caller's own coordinator address and token (the SDK reads JITMESH_CA_FILE and
    JITMESH_INSECURE itself)."""
    target, token = os.environ.get("JITMESH_COORDINATOR"), os.environ.get("JITMESH_TOKEN")
    if not target or not token:
        return None
    return target, token


def _request(options: ExecOptions) -> None:
    """File the request as the caller (their token), wait for approval and for the agent here
    to apply it."""
    import asyncio

    creds = _credentials()
    if creds is None:
        raise ExecFailed(
            "--request needs your own credentials: set JITMESH_COORDINATOR and JITMESH_TOKEN"
        )
    info = ask(options.state_dir, {"method": "info"})
    agent_name = str(info.get("agent", ""))
    assert options.request_duration is not None
    asyncio.run(_file_and_wait(creds, agent_name, options))
    deadline = time.monotonic() + WAIT_APPLIED
    while True:
        answer = ask(
            options.state_dir,
            {"method": "check", "subject": options.subject, "action": options.action},
        )
        if answer.get("allowed"):
            return
        if time.monotonic() > deadline:
            raise ExecFailed("approved, but not applied on this host in time", EXIT_DENIED)
        time.sleep(0.1)


async def _file_and_wait(creds: tuple[str, str], agent_name: str, options: ExecOptions) -> None:
    from jitmesh import Client, RequestState

    target, token = creds
    async with await Client.connect(target, token=token) as client:
        assert options.request_duration is not None
        request, _ = await client.create_request(
            agent=agent_name,
            action=options.action,
            duration=options.request_duration,
            reason=options.request_reason,
        )
        if options.subject and request.subject != options.subject:
            raise ExecFailed(
                f"the credentials given are {request.subject}'s, not {options.subject}'s: "
                "a request is filed with the subject's own token"
            )
        print(
            f"jitmesh-agent exec: request {request.id} {request.state.value.lower()}",
            file=sys.stderr,
        )
        if request.state is RequestState.PENDING:
            request = await client.wait_for_request(
                request.id,
                until=lambda r: r.state is not RequestState.PENDING,
                timeout=timedelta(hours=1),
            )
        if request.state is not RequestState.APPROVED:
            raise ExecFailed(f"request {request.id} {request.state.value.lower()}", EXIT_DENIED)


def _release_upstream(grant_id: str, ended_here: bool) -> None:
    """Release the grant on the coordinator as the caller; the host already ended it."""
    creds = _credentials()
    where = "ended on this host" if ended_here else "already ended on this host"
    if creds is None:
        print(f"jitmesh-agent exec: grant {grant_id} {where}", file=sys.stderr)
        return
    import asyncio

    async def release() -> None:
        from jitmesh import Client

        target, token = creds
        async with await Client.connect(target, token=token) as client:
            await client.release_grant(grant_id)

    try:
        asyncio.run(release())
        print(f"jitmesh-agent exec: grant {grant_id} released", file=sys.stderr)
    except Exception as exc:  # the host's end stands; the coordinator's record follows later
        print(
            f"jitmesh-agent exec: grant {grant_id} {where}; release on the coordinator failed "
            f"({type(exc).__name__})",
            file=sys.stderr,
        )
