"""The host half of the host tests: runs inside the private mount namespace that
`tests.host.sandbox` made (overlay over /etc, tmpfs over /home, /run, /var/log, /var/mail), never
elsewhere. `python -m tests.host.inside SCENARIO JSON_ARGS`; prints one JSON line with what it saw.

Real programs throughout: useradd, su, sudo and visudo, gpasswd, sshd and ssh, pamtester.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.domain.coverage import Cover
from agent.enforcers.sudo import Bundle, SudoEnforcer, SudoSettings

ID_U = "/usr/bin/id -u"
BIN = Path(sys.executable).parent


def _inside() -> None:
    # Refuse to run anywhere but in the sandbox: /etc must be the overlay.
    with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
        if not any(line.split()[4] == "/etc" and " overlay " in line for line in mounts):
            raise SystemExit("tests.host.inside runs only under tests.host.sandbox (no overlay)")


def sh(*argv: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str]:
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def make_user(name: str) -> None:
    home = f"/home/{name}"
    rc, out = sh("useradd", "-l", "-m", "-d", home, "-s", "/bin/sh", name)
    assert rc == 0, out


def as_user(user: str, command: str) -> tuple[int, str]:
    return sh("su", "-s", "/bin/sh", user, "-c", command)


def sudo_as(user: str, command: str) -> tuple[int, str]:
    """`sudo -n COMMAND` as `user` (never asks for a password: refused instead)."""
    return as_user(user, f"sudo -n {command}")


def wait_until(what: str, done: Callable[[], bool], timeout: float) -> float:
    """Poll `done` until it holds; the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic()


async def until(what: str, done: Callable[[], bool], timeout: float) -> None:
    """`wait_until` for scenarios whose event loop also runs the coordinator or the agent: the
    loop keeps serving (pushes, acks) while we wait."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def first_refusal(attempt: Callable[[], int], ends: datetime, timeout: float) -> dict[str, float]:
    """Attempts back to back until one fails, around the deadline `ends`. Each attempt's own
    time check lies somewhere inside it, so what can be known on a loaded machine is:
    `allowed_began_s`, when the last allowed attempt began, in seconds from `ends` (later than a
    small margin means access was allowed late; -inf when none was allowed), and `refused_ended_s`,
    when the first refused attempt ended (well before 0 means it was refused early)."""
    deadline = time.monotonic() + timeout
    allowed = float("-inf")
    while time.monotonic() < deadline:
        began = datetime.now(UTC)
        refused = attempt() != 0
        ended = datetime.now(UTC)
        if refused:
            return {
                "allowed_began_s": allowed,
                "refused_ended_s": (ended - ends).total_seconds(),
            }
        allowed = (began - ends).total_seconds()
        time.sleep(0.05)
    raise AssertionError(f"still allowed after {timeout}s")


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and everything below it (su's child runs as another user, in its own
    session: killing su alone leaves it behind)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        kill_tree(int(child))
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def whole_second(at: datetime) -> datetime:
    return at.replace(microsecond=0)


# Scenarios


async def sudo_enforcer(scratch: str) -> dict[str, Any]:
    make_user("alice")
    make_user("bob")
    enforcer = SudoEnforcer(SudoSettings({"restart": Bundle((ID_U,))}))
    seen: dict[str, Any] = {}
    now = whole_second(datetime.now(UTC))
    hour = Cover("alice", "restart", "grt-" + "a" * 32, now, now + timedelta(hours=1))
    seen["before"] = sudo_as("alice", ID_U)[0]
    await enforcer.apply(hour)
    path = enforcer.path_for("alice", "restart")
    st = path.stat()
    seen["mode"] = oct(st.st_mode & 0o7777)
    seen["owner"] = st.st_uid
    seen["file"] = path.read_text()
    seen["listed"] = sh("sudo", "-l", "-U", "alice")[1]
    seen["allowed"] = sudo_as("alice", ID_U)
    seen["other_args"] = sudo_as("alice", "/usr/bin/id")[0]
    seen["other_command"] = sudo_as("alice", "/bin/cat /etc/shadow")[0]
    seen["bob"] = sudo_as("bob", ID_U)[0]
    seen["observed"] = sorted(await enforcer.observe())
    # Drift: a rule added by hand to the managed drop-in.
    with path.open("a") as file:
        file.write("alice ALL=(ALL) NOPASSWD: ALL\n")
    seen["observed_after_edit"] = sorted(await enforcer.observe())
    seen["edited_file_left"] = path.exists()
    seen["edited_rule_works"] = sudo_as("alice", "/bin/cat /etc/shadow")[0] == 0
    # Applied again (what the reconcile does), then taken away.
    await enforcer.apply(hour)
    seen["reapplied"] = sudo_as("alice", ID_U)[0]
    await enforcer.remove("alice", "restart")
    seen["after_remove"] = sudo_as("alice", ID_U)[0]
    seen["files_left"] = sorted(os.listdir("/etc/sudoers.d"))
    # Extension: the deadline in the drop-in moves; one file, still allowed.
    short = Cover("alice", "restart", "grt-" + "b" * 32, now, now + timedelta(seconds=30))
    await enforcer.apply(short)
    await enforcer.extend(
        Cover("alice", "restart", "grt-" + "c" * 32, now, now + timedelta(hours=2))
    )
    seen["extended_file"] = path.read_text()
    seen["extended_allowed"] = sudo_as("alice", ID_U)[0]
    # The host's own deadline: NOTAFTER passes with the drop-in still in place.
    start = datetime.now(UTC)
    ends = whole_second(start) + timedelta(seconds=3)
    await enforcer.apply(Cover("alice", "restart", "grt-" + "d" * 32, start, ends))
    seen["native_allowed_before"] = sudo_as("alice", ID_U)[0]
    seen["native_refused"] = first_refusal(lambda: sudo_as("alice", ID_U)[0], ends, 15)
    seen["native_file_still_there"] = path.exists()
    return seen


class Coordinator:
    """A real coordinator in this process (SQLite, gRPC on a loopback port, the dev policy:
    developers may `restart` on env=staging at once), alice a developer."""

    JOIN = "jmj_host-test-join-token"
    ADMIN = "jmt_host-admin"

    def __init__(self, root: Path) -> None:
        self.root = root

    async def __aenter__(self) -> Coordinator:
        from server.app import build
        from server.config import CoordinatorConfig
        from server.domain.models import ADMIN_GROUP, Principal
        from server.domain.policy import DEV_POLICY

        config = CoordinatorConfig(
            data_dir=self.root / "coordinator", port=0, default_policy=DEV_POLICY
        )
        self.server = await build(config)
        admin = Principal("admin", frozenset({ADMIN_GROUP}))
        await self.server.fleet.create_join_token(admin, {}, None, max_uses=None, token=self.JOIN)
        await self.server.identity.ensure_user("alice", ["developers"], "jmt_host-alice")
        await self.server.identity.ensure_user("admin", [ADMIN_GROUP], self.ADMIN)
        self.runner = asyncio.create_task(self.server.run())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def connected(self, name: str) -> None:
        async with asyncio.timeout(20):
            while not self.server.registry.connected(name):
                await asyncio.sleep(0.02)

    async def __aexit__(self, *exc: object) -> None:
        self.runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.runner


def start_agent(root: Path, address: str, *enforcers: str) -> subprocess.Popen[bytes]:
    return start_agent_at(root, address, root / "agent-state", *enforcers)


def start_agent_at(
    root: Path, address: str, state: Path, *enforcers: str
) -> subprocess.Popen[bytes]:
    """`start_agent` with its state directory at `state` (under /run for a socket other local
    users can reach: the scratch directory may not be)."""
    log = (root / "agent.log").open("ab")
    return subprocess.Popen(
        [str(BIN / "jitmesh-agent"), "--coordinator", address, "--name", "web-1",
         "--label", "env=staging", "--join-token", Coordinator.JOIN, "--state", str(state),
         "--backoff-base", "0.1", "--backoff-cap", "0.5",
         *[f"--enforcer={e}" for e in enforcers]],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def agent_config(root: Path, text: str) -> Path:
    path = root / "agent.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


async def sudo_agent(scratch: str, seconds: int) -> dict[str, Any]:
    """The README's walk-through: alice gets `restart` (sudo) and `logs` (an SSH key) on web-1
    for a few seconds through the coordinator. With the agent running, its expiry removes both
    on time; then again with the agent SIGKILLed while the grants are live: sudo and sshd refuse
    after not_after on their own, and the agent, started again, removes what expired."""
    from jitmesh import Client

    root = Path(scratch)
    make_user("alice")
    sshd = Sshd(root)
    config = agent_config(
        root,
        f'[enforcers.sudo.actions]\nrestart = ["{ID_U}"]\n'
        f'[enforcers.ssh]\nkeys = "{sshd.keys}"\nactions = ["logs"]\n',
    )
    seen: dict[str, Any] = {}
    dropin = Path("/etc/sudoers.d/jitmesh_alice__restart")
    keyfile = Path("/etc/ssh/jitmesh_keys/alice")
    enforcers = (f"sudo:{config}", f"ssh:{config}")
    async with Coordinator(root) as coordinator:
        agent = start_agent(root, coordinator.address, *enforcers)
        try:
            await coordinator.connected("web-1")
            async with await Client.connect(coordinator.address, token="jmt_host-alice") as alice:
                for case in ("running", "killed"):
                    grants = {}
                    for action in ("restart", "logs"):
                        _, grant = await alice.create_request(
                            agent="web-1", action=action, duration=timedelta(seconds=seconds)
                        )
                        assert grant is not None
                        grants[action] = grant
                    await until(
                        "the drop-in and the keys", lambda: dropin.exists() and keyfile.exists(), 15
                    )
                    # Blocking probes in a thread: the coordinator in this loop keeps serving.
                    allowed = await asyncio.to_thread(sudo_as, "alice", ID_U)
                    seen[f"{case}_sudo_allowed"] = allowed[0]
                    seen[f"{case}_ssh_allowed"] = (await asyncio.to_thread(sshd.login))[0]
                    seen[f"{case}_file"] = dropin.read_text()
                    if case == "killed":
                        agent.kill()
                        agent.wait(timeout=10)
                    # In a thread: the coordinator in this loop keeps serving meanwhile.
                    seen[f"{case}_sudo_refused"] = await asyncio.to_thread(
                        first_refusal,
                        lambda: sudo_as("alice", ID_U)[0],
                        grants["restart"].not_after,
                        3 * seconds,
                    )
                    seen[f"{case}_ssh_refused"] = await asyncio.to_thread(
                        first_refusal,
                        lambda: sshd.login()[0],
                        grants["logs"].not_after,
                        3 * seconds,
                    )
                    if case == "running":
                        await until(
                            "the agent to remove both",
                            lambda: not (dropin.exists() or keyfile.exists()),
                            10,
                        )
                        removed = datetime.now(UTC)
                        seen["running_removed_after_s"] = (
                            removed - grants["logs"].not_after
                        ).total_seconds()
                    else:
                        seen["killed_files_still_there"] = [dropin.exists(), keyfile.exists()]
                        # Started again, the agent ends what expired while it was down.
                        agent = start_agent(root, coordinator.address, *enforcers)
                        await until(
                            "the restarted agent to clean up",
                            lambda: not (dropin.exists() or keyfile.exists()),
                            20,
                        )
                        seen["restarted_cleaned_up"] = True
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait(timeout=10)
            sshd.stop()
    return seen


class Sshd:
    """sshd on a loopback port (host keys made in the overlay), with alice's key registered for
    the ssh enforcer and the managed file named in AuthorizedKeysFile."""

    def __init__(self, root: Path) -> None:
        import socket

        from tests.e2e.procs import free_port

        assert sh("usermod", "-p", "*", "alice")[0] == 0  # not locked (no password, keys only)
        assert sh("ssh-keygen", "-A")[0] == 0
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.key = root / "alice_key"
        assert sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))[0] == 0
        self.keys = Path("/etc/jitmesh/ssh-keys")
        self.keys.mkdir(parents=True)
        (self.keys / "alice.pub").write_text(Path(f"{self.key}.pub").read_text())
        Path("/etc/ssh/sshd_config.d/jitmesh.conf").write_text(
            "AuthorizedKeysFile .ssh/authorized_keys /etc/ssh/jitmesh_keys/%u\n"
        )
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-p", str(self.port), "-o", "ListenAddress=127.0.0.1"],
            stdout=(root / "sshd.log").open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip

        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until("sshd", listening, timeout=20)

    def login(self) -> tuple[int, str]:
        return sh(
            "ssh", "-i", str(self.key), "-p", str(self.port), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "alice@127.0.0.1", "id -un",
        )  # fmt: skip

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


async def ash(*argv: str, timeout: float = 60) -> tuple[int, str]:
    """A command from inside the event loop (the agent serves in this same loop)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(timeout):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode().strip()


def agent_cli(user: str | None, *args: str) -> list[str]:
    """`jitmesh-agent ARGS`, as `user` through su (None: as root)."""
    argv = [str(BIN / "jitmesh-agent"), *args]
    if user is None:
        return argv
    return ["su", "-s", "/bin/sh", user, "-c", " ".join(shlex.quote(a) for a in argv)]


class LocalAgent:
    """An engine with the file enforcer, its sessions and its local socket, in this process, on
    the real clock; commands are handed to it directly (no coordinator needed here)."""

    def __init__(
        self, state: Path, *, grace: float = 1.0, end: str = "exec", enforcers: Any = None
    ) -> None:
        from agent.app import prepare_state_dir
        from agent.enforcers.base import EnforcerSet
        from agent.enforcers.file import FileEnforcer
        from agent.engine import Engine
        from agent.local.server import LocalServer
        from agent.local.sessions import EndSessions, Sessions
        from agent.store.sqlite import SqliteLeaseStore
        from jitmesh.clock import SystemClock

        self.state = prepare_state_dir(state)
        self.store = SqliteLeaseStore.open(state)
        clock = SystemClock()
        self.engine = Engine(
            name="web-1",
            store=self.store,
            enforcers=EnforcerSet(enforcers or [FileEnforcer(state.parent / "markers")]),
            clock=clock,
        )
        self.sessions = Sessions(
            clock=clock,
            audit=self.engine.audit,
            holds_any=self.engine.holds_any,
            grace=grace,
            end=EndSessions(end),
        )
        self.engine.on_access_removed(self.sessions.removed)
        self.server = LocalServer(
            state_dir=state, name="web-1", engine=self.engine, sessions=self.sessions, clock=clock
        )
        self.seq = 0

    async def __aenter__(self) -> LocalAgent:
        await self.engine.start()
        self.tasks = [
            asyncio.create_task(c)
            for c in (self.engine.run(), self.sessions.run(), self.server.run())
        ]
        await asyncio.wait_for(self.server.ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.store.close()

    async def grant(self, subject: str, action: str, seconds: float = 3600) -> str:
        from agent.domain.commands import GrantSpec
        from agent.domain.leases import HOLD

        now = datetime.now(UTC)
        grant_id = "grt-" + os.urandom(16).hex()
        spec = GrantSpec(
            grant_id, subject, action, now - timedelta(seconds=1),
            now + timedelta(seconds=seconds), HOLD,
        )  # fmt: skip
        ack = await self._command(spec)
        assert ack.status.value == "APPLIED", ack
        return grant_id

    async def revoke(self, grant_id: str) -> None:
        from agent.domain.commands import RevokeSpec

        ack = await self._command(RevokeSpec(grant_id))
        assert ack.status.value == "APPLIED", ack

    async def _command(self, kind: Any) -> Any:
        from agent.domain.commands import CommandSpec

        self.seq += 1
        return await self.engine.handle(
            CommandSpec(seq=self.seq, agent="web-1", body_seq=self.seq, epoch=1, kind=kind)
        )

    async def events(self) -> list[tuple[str, dict[str, str]]]:
        return [(e.kind, dict(e.details)) for e in await self.store.pending_events(1000)]


async def local_exec(scratch: str) -> dict[str, Any]:
    """The local socket (who the caller is decides whom they may ask about) and exec: exit code
    through, run as the subject, ended by a revoke (SIGTERM, then SIGKILL after the grace),
    --release ending the grant on the host, refused without a grant; all audited."""
    make_user("alice")
    make_user("bob")
    seen: dict[str, Any] = {}
    state = Path("/run/jitmesh-test/state")
    state.parent.mkdir(parents=True)
    async with LocalAgent(state) as agent:
        s = str(state)
        seen["mode"] = oct(state.stat().st_mode & 0o777)
        seen["alice_check_none"] = await ash(
            *agent_cli("alice", "check", "--state", s, "--action", "deploy")
        )
        grant = await agent.grant("alice", "deploy")
        seen["alice_check"] = await ash(
            *agent_cli("alice", "check", "--state", s, "--action", "deploy")
        )
        seen["alice_names_bob"] = await ash(
            *agent_cli("alice", "check", "--state", s, "--subject", "bob", "--action", "deploy")
        )
        seen["bob_check"] = await ash(
            *agent_cli("bob", "check", "--state", s, "--action", "deploy")
        )
        seen["root_names_alice"] = await ash(
            *agent_cli(None, "check", "--state", s, "--subject", "alice", "--action", "deploy")
        )
        # The exit code passes through; the command runs as the caller.
        seen["exit7"] = await ash(
            *agent_cli(
                "alice",
                "exec",
                "--state",
                s,
                "--action",
                "deploy",
                "--",
                "sh",
                "-c",
                "id -un; exit 7",
            )
        )
        # Root runs it as the subject.
        seen["root_as_alice"] = await ash(
            *agent_cli(
                None,
                "exec",
                "--state",
                s,
                "--subject",
                "alice",
                "--action",
                "deploy",
                "--",
                "id",
                "-un",
            )
        )
        seen["bob_exec"] = await ash(
            *agent_cli("bob", "exec", "--state", s, "--action", "deploy", "--", "true")
        )
        # A revoke ends a running command: SIGTERM ...
        running = asyncio.create_task(
            ash(
                *agent_cli("alice", "exec", "--state", s, "--action", "deploy", "--", "sleep", "60")
            )
        )
        await until("the run to start", lambda: bool(agent.sessions.runs), 20)
        started = time.monotonic()
        await agent.revoke(grant)
        seen["revoked_run"] = await running
        seen["revoked_after_s"] = time.monotonic() - started
        # ... then SIGKILL for a command that ignores SIGTERM (grace 1 s).
        grant = await agent.grant("alice", "deploy")
        trapped = Path("/run/jitmesh-test/alice/trapped")
        trapped.parent.mkdir()
        shutil.chown(trapped.parent, "alice")
        stubborn = asyncio.create_task(
            ash(*agent_cli("alice", "exec", "--state", s, "--action", "deploy", "--grace", "30",
                           "--", "sh", "-c", f"trap '' TERM; touch {trapped}; sleep 60; sleep 60"))
        )  # fmt: skip
        await until("the trap file", trapped.exists, 20)
        started = time.monotonic()
        await agent.revoke(grant)
        seen["killed_run"] = await stubborn
        seen["killed_after_s"] = time.monotonic() - started
        # --release: access ends with the command.
        grant = await agent.grant("alice", "deploy")
        seen["release_run"] = await ash(
            *agent_cli(
                "alice", "exec", "--state", s, "--action", "deploy", "--release", "--", "true"
            )
        )
        lease = await agent.store.lease(grant)
        seen["released_state"] = (lease.state.value, lease.remove_reason) if lease else None
        seen["after_release_check"] = await ash(
            *agent_cli("alice", "check", "--state", s, "--action", "deploy")
        )
        seen["events"] = await agent.events()
    return seen


async def exec_expiry(scratch: str) -> dict[str, Any]:
    """A command run through exec is ended when its grant expires mid-run (the agent's own
    expiry, no revoke from anywhere), audited with cause expired."""
    make_user("alice")
    state = Path("/run/jitmesh-test/state")
    state.parent.mkdir(parents=True)
    seen: dict[str, Any] = {}
    async with LocalAgent(state) as agent:
        grant = await agent.grant("alice", "deploy", seconds=3)
        lease = await agent.store.lease(grant)
        assert lease is not None
        run = ["exec", "--state", str(state), "--action", "deploy", "--", "sleep", "60"]
        seen["run"] = await ash(*agent_cli("alice", *run))
        seen["ended_after_s"] = (datetime.now(UTC) - lease.not_after).total_seconds()
        # The sessions loop records what it ended after the signal, so possibly after the exec
        # client (which the signal ended) returned: wait for its record.
        async with asyncio.timeout(20):
            while not [d for k, d in await agent.events() if k == "sessions.ended"]:
                await asyncio.sleep(0.05)
        seen["events"] = [
            d for k, d in await agent.events() if k in ("exec.exited", "sessions.ended")
        ]
    return seen


async def end_user_sessions(scratch: str) -> dict[str, Any]:
    """end_sessions = "user": every process of alice ends with her last grant on the host (not
    with the first of two), audited; bob's processes are left alone."""
    make_user("alice")
    make_user("bob")
    state = Path("/run/jitmesh-test/state")
    state.parent.mkdir(parents=True)
    seen: dict[str, Any] = {}

    def login_shell(user: str) -> subprocess.Popen[bytes]:
        # A session of the user's own, started outside jitmesh (as sshd or login would).
        return subprocess.Popen(
            ["su", "-s", "/bin/sh", user, "-c", "sleep 300"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def running(user: str) -> bool:
        return sh("pgrep", "-u", user, "sleep")[0] == 0

    async with LocalAgent(state, end="user") as agent:
        first = await agent.grant("alice", "deploy")
        second = await agent.grant("alice", "logs")
        alice, bob = login_shell("alice"), login_shell("bob")
        await until("both sessions", lambda: running("alice") and running("bob"), 20)
        await agent.revoke(first)
        # The sessions loop has taken the removal and looked: alice still holds `logs`.
        await until("the sessions to settle", agent.sessions.idle, 5)
        seen["after_first"] = running("alice")
        await agent.revoke(second)
        await until("alice's session to end", lambda: not running("alice"), 20)
        seen["alice_ended"] = True
        seen["bob_running"] = running("bob")
        async with asyncio.timeout(20):
            while not [d for k, d in await agent.events() if k == "sessions.ended"]:
                await asyncio.sleep(0.05)
        seen["events"] = [d for k, d in await agent.events() if k == "sessions.ended"]
        for proc in (alice, bob):
            kill_tree(proc.pid)
            proc.wait(timeout=10)
    return seen


async def exec_request(scratch: str) -> dict[str, Any]:
    """`exec --request --release` as alice with her own token: the request is filed as alice,
    approved, applied by the real agent, the command runs, and the grant is released on the
    coordinator when it ends. Without credentials --request refuses to go on."""
    from jitmesh import Client

    root = Path(scratch)
    make_user("alice")
    state = Path("/run/jitmesh-test/state")
    state.parent.mkdir(parents=True)
    seen: dict[str, Any] = {}
    async with Coordinator(root) as coordinator:
        agent = subprocess.Popen(
            [str(BIN / "jitmesh-agent"), "--coordinator", coordinator.address, "--name", "web-1",
             "--label", "env=staging", "--join-token", Coordinator.JOIN, "--state", str(state),
             "--backoff-base", "0.1", "--enforcer", f"file:{root / 'markers'}"],
            stdout=(root / "agent.log").open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            await coordinator.connected("web-1")
            await until("the socket", (state / "agent.sock").exists, 20)
            creds = [
                "env", f"JITMESH_COORDINATOR={coordinator.address}",
                "JITMESH_TOKEN=jmt_host-alice", "JITMESH_INSECURE=1",
            ]  # fmt: skip
            command = [
                "exec", "--state", str(state), "--action", "restart", "--request",
                "--duration", "5m", "--reason", "INC-42", "--release", "--", "id", "-un",
            ]  # fmt: skip
            argv = agent_cli("alice", *command)
            argv[-1] = " ".join(shlex.quote(a) for a in creds) + " " + argv[-1]
            seen["run"] = await ash(*argv)
            async with await Client.connect(coordinator.address, token="jmt_host-alice") as alice:
                grants = await alice.list_grants()
                seen["grants"] = [(g.action, g.state.value) for g in grants]
            seen["no_creds"] = await ash(*agent_cli("alice", *command))
            # Without her credentials, --release still ends the grant on the host, and the
            # agent's report of it ends the grant in the coordinator's record too.
            async with await Client.connect(coordinator.address, token="jmt_host-alice") as alice:
                _, grant = await alice.create_request(
                    agent="web-1", action="restart", duration=timedelta(minutes=5)
                )
                assert grant is not None
                s = str(state)
                check = agent_cli("alice", "check", "--state", s, "--action", "restart")
                async with asyncio.timeout(20):
                    while (await ash(*check))[0] != 0:
                        await asyncio.sleep(0.05)
                release = ["exec", "--state", s, "--action", "restart", "--release", "--", "true"]
                seen["host_release"] = await ash(*agent_cli("alice", *release))
                async with asyncio.timeout(20):
                    while (await alice.get_grant(grant.id)).state.value != "RELEASED":
                        await asyncio.sleep(0.05)
                seen["host_released"] = (await alice.get_grant(grant.id)).state.value
                # A lock on alice ends a command she runs under a live grant.
                _, grant = await alice.create_request(
                    agent="web-1", action="restart", duration=timedelta(minutes=5)
                )
                assert grant is not None
                async with asyncio.timeout(20):
                    while (await ash(*check))[0] != 0:
                        await asyncio.sleep(0.05)
                sleeping = ["exec", "--state", s, "--action", "restart", "--", "sleep", "60"]
                running = asyncio.create_task(ash(*agent_cli("alice", *sleeping)))
                async with asyncio.timeout(20):
                    while (await ash("pgrep", "-u", "alice", "sleep"))[0] != 0:
                        await asyncio.sleep(0.05)
                async with await Client.connect(
                    coordinator.address, token=Coordinator.ADMIN
                ) as admin:
                    await admin.create_lock(subject="alice", reason="INC-99")
                seen["locked_run"] = await running
        finally:
            agent.kill()
            agent.wait(timeout=10)
    return seen


async def breakglass_caller(scratch: str) -> dict[str, Any]:
    """`jitmesh-agent breakglass CODE` over the real agent's socket, the caller told by the
    kernel (SO_PEERCRED): with a code an admin issued for alice on web-1, bob as himself is
    refused (the code left unused), alice as herself gets her access, the same code again is
    refused, and root may present another of alice's codes. The uses reach the coordinator with
    who presented each."""
    from jitmesh import Client

    root = Path(scratch)
    make_user("alice")
    make_user("bob")
    state = Path("/run/jitmesh-test/state")
    state.parent.mkdir(parents=True)
    markers = root / "markers"
    seen: dict[str, Any] = {}
    async with Coordinator(root) as coordinator:
        agent = start_agent_at(root, coordinator.address, state, f"file:{markers}")
        try:
            await coordinator.connected("web-1")
            await until("the socket", (state / "agent.sock").exists, 20)
            async with await Client.connect(coordinator.address, token=Coordinator.ADMIN) as admin:
                issued = await admin.issue_breakglass_codes(
                    "web-1", "restart", "alice", timedelta(minutes=10),
                    valid_for=timedelta(days=1), count=2, reason="on-call kit",
                )  # fmt: skip
                (first, code), (second, other) = issued
                seen["codes"] = [first.id, second.id]
                s = str(state)

                def present(user: str | None, text: str) -> list[Any]:
                    rc, out = sh(*agent_cli(user, "breakglass", "--state", s, text))
                    return [rc, out, text in out]

                def check(user: str) -> int:
                    return sh(*agent_cli(user, "check", "--state", s, "--action", "restart"))[0]

                # Blocking probes in a thread: the coordinator in this loop keeps serving.
                seen["bob"] = await asyncio.to_thread(present, "bob", code)
                seen["bob_marker"] = (markers / "alice:restart").exists()
                seen["alice_check_before"] = await asyncio.to_thread(check, "alice")
                seen["alice"] = await asyncio.to_thread(present, "alice", code)
                seen["alice_marker"] = (markers / "alice:restart").exists()
                seen["alice_check"] = await asyncio.to_thread(check, "alice")
                seen["bob_check"] = await asyncio.to_thread(check, "bob")
                seen["alice_again"] = await asyncio.to_thread(present, "alice", code)
                seen["root"] = await asyncio.to_thread(present, None, other)

                async def adopted() -> list[tuple[str, str, str]]:
                    events = await admin.list_audit(kind="breakglass.used")
                    return sorted(
                        (e.details["code_id"], e.details.get("caller", ""), e.subject)
                        for e in events
                    )

                async with asyncio.timeout(20):
                    while len(await adopted()) < 2:
                        await asyncio.sleep(0.05)
                seen["adopted"] = await adopted()
                everything = json.dumps([e.details for e in await admin.list_audit(limit=1000)])
                seen["codes_in_audit"] = code in everything or other in everything
        finally:
            agent.kill()
            agent.wait(timeout=10)
    seen["codes_in_agent_log"] = any(t in (root / "agent.log").read_text() for t in (code, other))
    return seen


async def sudo_overlap(scratch: str) -> dict[str, Any]:
    """Overlapping grants through the engine with the real sudo: one drop-in, its NOTAFTER the
    latest deadline of the live grants, moved back when the longest is revoked, removed with the
    last; sudo allows all along until then."""
    import re

    make_user("alice")
    state = Path("/run/jitmesh-test/state")
    state.parent.mkdir(parents=True)
    enforcer = SudoEnforcer(SudoSettings({"restart": Bundle((ID_U,))}))
    dropin = enforcer.path_for("alice", "restart")
    seen: dict[str, Any] = {}

    def notafter() -> str:
        found = re.search(r"NOTAFTER=(\d+Z)", dropin.read_text()) if dropin.exists() else None
        return found.group(1) if found else ""

    async with LocalAgent(state, enforcers=[enforcer]) as agent:
        short = await agent.grant("alice", "restart", seconds=3600)
        seen["one"] = notafter()
        long = await agent.grant("alice", "restart", seconds=7200)
        seen["two"] = notafter()
        seen["two_allowed"] = sudo_as("alice", ID_U)[0]
        await agent.revoke(long)
        seen["back_to_one"] = notafter()
        seen["one_allowed"] = sudo_as("alice", ID_U)[0]
        await agent.revoke(short)
        seen["none_left"] = dropin.exists()
        seen["none_allowed"] = sudo_as("alice", ID_U)[0]
    return seen


PAM_SNIPPET = """\
# /etc/pam.d/{service}: log in only with a live jitmesh grant for the `login` action.
auth     required pam_permit.so
account  required pam_exec.so quiet {agent} check --pam --state {state} --action login
"""


async def pam_login(scratch: str) -> dict[str, Any]:
    """`jitmesh-agent check` as a pam_exec account module, through pamtester."""
    make_user("alice")
    make_user("bob")
    state = Path("/run/jitmesh-test/state")
    state.parent.mkdir(parents=True)
    Path("/etc/pam.d/jitmesh-login").write_text(
        PAM_SNIPPET.format(service="jitmesh-login", agent=BIN / "jitmesh-agent", state=state)
    )
    seen: dict[str, Any] = {}

    async def login(user: str) -> int:
        return (await ash("pamtester", "jitmesh-login", user, "acct_mgmt"))[0]

    async with LocalAgent(state) as agent:
        seen["without"] = await login("alice")
        grant = await agent.grant("alice", "login")
        seen["with"] = await login("alice")
        seen["other_user"] = await login("bob")
        await agent.grant("alice", "deploy")
        await agent.revoke(grant)
        seen["other_action_only"] = await login("alice")
        await agent.grant("alice", "login")
    # The agent stopped: root's check reads the lease table (expiry still by not_after).
    seen["agent_down"] = await login("alice")
    seen["agent_down_bob"] = await login("bob")
    return seen


def members(group: str) -> list[str]:
    import grp

    return sorted(grp.getgrnam(group).gr_mem)


async def group_enforcer(scratch: str) -> dict[str, Any]:
    """Membership per action with gpasswd: a group shared by two actions stays while one holds;
    a member added by hand is found and removed by the engine's reconcile (audited)."""
    from agent.enforcers.group import GroupEnforcer, GroupSettings

    for user in ("alice", "mallory"):
        make_user(user)
    for group in ("deployers", "builders"):
        assert sh("groupadd", group)[0] == 0
    settings = GroupSettings({"deploy": ("deployers", "builders"), "build": ("builders",)})
    enforcer = GroupEnforcer(settings)
    now = whole_second(datetime.now(UTC))
    seen: dict[str, Any] = {}

    def window(action: str) -> Cover:
        return Cover("alice", action, "grt-" + "e" * 32, now, now + timedelta(hours=1))

    await enforcer.apply(window("deploy"))
    seen["deploy"] = [members("deployers"), members("builders")]
    seen["id"] = sh("id", "-nG", "alice")[1]
    await enforcer.apply(window("build"))
    await enforcer.remove("alice", "deploy")
    # builders is still needed by build.
    seen["after_deploy_removed"] = [members("deployers"), members("builders")]
    await enforcer.remove("alice", "build")
    seen["after_both_removed"] = [members("deployers"), members("builders")]
    # Drift through the engine: the reconcile removes a member nobody granted.
    state = Path("/run/jitmesh-test/state")
    state.parent.mkdir(parents=True)
    async with LocalAgent(state, enforcers=[GroupEnforcer(settings)]) as agent:
        await agent.grant("alice", "build")
        assert sh("gpasswd", "-a", "mallory", "builders")[0] == 0
        seen["engine_applied"] = members("builders")
        await agent.engine.reconcile()
        seen["after_reconcile"] = members("builders")
        seen["events"] = await agent.events()
    return seen


async def ssh_enforcer(scratch: str) -> dict[str, Any]:
    """A real login over loopback with a key, allowed while the grant holds and refused by sshd
    itself after expiry-time (the file still in place: nobody removed it)."""
    from agent.enforcers.ssh import SshEnforcer, SshSettings

    make_user("alice")
    make_user("bob")
    sshd = Sshd(Path(scratch))
    seen: dict[str, Any] = {}
    seen["sshd_T"] = [
        line for line in sh("/usr/sbin/sshd", "-T")[1].splitlines()
        if line.startswith("authorizedkeysfile")
    ]  # fmt: skip
    try:
        enforcer = SshEnforcer(SshSettings(sshd.keys, frozenset({"ssh"})))
        seen["before"] = sshd.login()[0]
        start = datetime.now(UTC)
        ends = whole_second(start) + timedelta(seconds=3)
        await enforcer.apply(Cover("alice", "ssh", "grt-" + "f" * 32, start, ends))
        path = enforcer.path_for("alice")
        st = path.stat()
        seen["mode"], seen["owner"] = oct(st.st_mode & 0o777), st.st_uid
        seen["file"] = path.read_text()
        seen["login"] = sshd.login()
        seen["observed"] = sorted(await enforcer.observe())
        seen["refused"] = first_refusal(lambda: sshd.login()[0], ends, 15)
        seen["file_still_there"] = path.exists()
        try:
            await enforcer.apply(Cover("bob", "ssh", "grt-" + "f" * 32, start, ends))
            seen["bob"] = "applied"
        except Exception as exc:
            seen["bob"] = str(exc)
    finally:
        sshd.stop()
    return seen


SYSTEMCTL = """#!/bin/sh
# systemctl inside the sandbox (no systemd here): says what it was asked to do, as whom.
echo "systemctl $*: done as $(id -un)"
"""


async def readme_sudo(scratch: str, text: str) -> dict[str, Any]:
    """tests/host/test_readme.py: the README's sudo walkthrough as a bash script, run as root
    from a directory every user can reach (su keeps it as alice's working directory), with
    this checkout's programs on PATH and no JITMESH_ variables but what the README sets."""
    root = Path(scratch)
    stub = root / "systemctl"
    stub.write_text(SYSTEMCTL)
    stub.chmod(0o755)
    assert sh("mount", "--bind", str(stub), "/usr/bin/systemctl")[0] == 0
    work = Path("/run/readme")
    work.mkdir(mode=0o755)
    (work / "walkthrough.sh").write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITMESH_")}
    env.update(
        PATH=f"{BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        HOME="/root",
        XDG_CONFIG_HOME=str(root / "config"),
    )
    proc = await asyncio.create_subprocess_exec(
        "bash", "walkthrough.sh", cwd=work, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(200):
        out, _ = await proc.communicate()
    grants = work / "grants.json"
    return {
        "rc": proc.returncode,
        "output": out.decode(),
        "logs": {p.name: p.read_text() for p in sorted(work.glob("bg-*.log"))},
        "grants": json.loads(grants.read_text()) if grants.exists() else [],
    }


SCENARIOS: dict[str, Callable[..., Coroutine[Any, Any, dict[str, Any]]]] = {
    "sudo_enforcer": sudo_enforcer,
    "sudo_agent": sudo_agent,
    "local_exec": local_exec,
    "exec_expiry": exec_expiry,
    "pam_login": pam_login,
    "end_user_sessions": end_user_sessions,
    "exec_request": exec_request,
    "sudo_overlap": sudo_overlap,
    "breakglass_caller": breakglass_caller,
    "group_enforcer": group_enforcer,
    "ssh_enforcer": ssh_enforcer,
    "readme_sudo": readme_sudo,
}


def main() -> None:
    _inside()
    name, raw = sys.argv[1], sys.argv[2]
    args = json.loads(raw)
    result = asyncio.run(SCENARIOS[name](*args))
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
