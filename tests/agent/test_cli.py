"""`jitmesh-agent` as a process: `check` exit codes, flag errors, a run stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.domain.leases import Lease, LeaseState
from agent.store.sqlite import SqliteLeaseStore

from .coordinator import grant_body, serving
from .factories import gid, lease

AGENT_BIN = str(Path(sys.executable).parent / "jitmesh-agent")
ALLOWED, DENIED, USAGE = 0, 1, 2


def agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AGENT_BIN, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def check(state: Path, subject: str, action: str) -> subprocess.CompletedProcess[str]:
    return agent("check", "--state", str(state), "--subject", subject, "--action", action)


@pytest.fixture
async def state(tmp_path: Path) -> Path:
    """A lease table written by the agent's own store, around the real current time."""
    now = datetime.now(UTC)
    store = SqliteLeaseStore.open(tmp_path)
    try:
        await store.claim("web-1", "boot")
        active = lease("alice", "deploy", grant_id="grt-" + "a" * 32)
        writes = [
            _around(active, now - timedelta(minutes=1), now + timedelta(hours=1)),
            _around(lease("bob", "deploy"), now + timedelta(hours=1), now + timedelta(hours=2)),
            _around(lease("carol", "deploy"), now - timedelta(hours=2), now - timedelta(hours=1)),
            _around(
                lease("dave", "deploy", state=LeaseState.REMOVED),
                now - timedelta(minutes=1),
                now + timedelta(hours=1),
            ),
        ]
        await store.record_command(seq=1, epoch=1, writes=writes)
    finally:
        store.close()
    return tmp_path


def _around(item: Lease, not_before: datetime, not_after: datetime) -> Lease:
    # Stored instants are whole milliseconds.
    return replace(item, not_before=_ms(not_before), not_after=_ms(not_after))


def _ms(at: datetime) -> datetime:
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


def test_check_allows_an_active_lease(state: Path) -> None:
    result = check(state, "alice", "deploy")
    assert result.returncode == ALLOWED, result.stderr
    assert result.stdout.startswith(f"allowed: grant grt-{'a' * 32} until ")
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("subject", "action"),
    [("alice", "ssh"), ("bob", "deploy"), ("carol", "deploy"), ("dave", "deploy"), ("eve", "x")],
)
def test_check_denies_everything_else(state: Path, subject: str, action: str) -> None:
    result = check(state, subject, action)
    assert (result.returncode, result.stdout) == (DENIED, "not allowed\n")


def test_check_reports_usage_and_state_errors_with_exit_2(tmp_path: Path, state: Path) -> None:
    missing = check(tmp_path / "nowhere", "alice", "deploy")
    assert missing.returncode == USAGE
    assert missing.stderr.count("\n") == 1
    assert "no lease table" in missing.stderr

    hostile = check(state, "alice; rm -rf /", "deploy")
    assert hostile.returncode == USAGE
    assert "subject is not valid" in hostile.stderr
    assert "rm -rf" not in hostile.stderr

    no_action = agent("check", "--state", str(state), "--subject", "alice")
    assert no_action.returncode == USAGE
    assert no_action.stderr.count("\n") == 1
    assert "--action" in no_action.stderr

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "agent.db").write_bytes(b"")
    unmigrated = check(tmp_path / "empty", "alice", "deploy")
    assert unmigrated.returncode == USAGE
    assert "cannot read the lease table" in unmigrated.stderr
    # Read-only: it did not create the schema.
    assert (tmp_path / "empty" / "agent.db").read_bytes() == b""


def test_exec_and_breakglass_answer_help_and_name_a_missing_command(tmp_path: Path) -> None:
    """`exec --help` works before any `--` (it used to say "put the command after --")."""
    for command in ("exec", "breakglass", "check"):
        shown = agent(command, "--help")
        assert shown.returncode == ALLOWED, shown.stderr
        assert shown.stdout.startswith(f"usage: jitmesh-agent {command}"), shown.stdout
    shown = agent("exec", "--help")
    assert "-- COMMAND [ARG ...]" in shown.stdout
    assert "--release" in shown.stdout
    assert "--request" in shown.stdout
    assert "exec --help" in agent("--help").stdout
    state = str(tmp_path)
    for argv, words in (
        (("--state", state, "--action", "deploy"), "put the command after --"),
        (("--state", state, "--action", "deploy", "--"), "no command after --"),
        (("--action", "deploy", "--", "true"), "--state"),
        (("--state", state, "--action", "deploy", "--request", "--", "true"), "--duration"),
    ):
        done = agent("exec", *argv)
        assert done.returncode == USAGE, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert words in done.stderr, done.stderr


def test_check_never_writes_the_table(state: Path) -> None:
    db = state / "agent.db"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    assert check(state, "alice", "deploy").returncode == ALLOWED
    assert check(state, "bob", "deploy").returncode == DENIED
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert not (state / "agent.db-wal").exists() or (state / "agent.db-wal").stat().st_size == 0


def test_check_imports_neither_grpc_nor_the_agent_runtime(state: Path) -> None:
    probe = (
        "import sys\n"
        "from agent.__main__ import main\n"
        f"rc = main(['check', '--state', {str(state)!r}, '--subject', 'alice', '--action', 'x'])\n"
        "heavy = ('grpc', 'google', 'yoyo', 'pydantic', 'ruamel', 'asyncio', 'agent.engine',"
        " 'agent.rpc', 'agent.store.sqlite', 'agent.enforcers')\n"
        "print(rc, sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.splitlines()[-1] == "1 []", result.stderr


def test_run_flag_errors_exit_2_without_echoing_values(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "JITMESH_INSECURE": "1"}
    no_coordinator = agent("--name", "web-1", "--state", str(tmp_path), env=env)
    assert no_coordinator.returncode == USAGE
    assert "--coordinator" in no_coordinator.stderr

    bad_name = agent(
        "--coordinator", "127.0.0.1:1", "--name", "Evil<name>", "--state", str(tmp_path),
        "--join-token", "jmj_canary_token", env=env,
    )  # fmt: skip
    assert bad_name.returncode == USAGE
    assert "name" in bad_name.stderr
    assert "Evil<name>" not in bad_name.stderr
    assert "jmj_canary_token" not in bad_name.stderr

    no_token = agent(
        "--coordinator", "127.0.0.1:1", "--name", "web-1", "--state", str(tmp_path), env=env
    )
    assert no_token.returncode == USAGE
    assert "join token" in no_token.stderr

    state = tmp_path / "drift-state"
    bad_drift = agent(
        "--coordinator", "127.0.0.1:1", "--name", "web-1", "--state", str(state),
        "--enforcer", f"file:{tmp_path / 'a'}", "--enforcer", f"file,drift=keep:{tmp_path / 'b'}",
        env=env,
    )  # fmt: skip
    assert bad_drift.returncode == USAGE
    assert bad_drift.stderr.strip() == (
        "jitmesh-agent: configuration: --enforcer number 2: enforcer file: "
        "drift must be remove or report"
    )
    assert not state.exists()  # nothing created


def test_the_agent_needs_a_ca_file_or_an_explicit_insecure(tmp_path: Path) -> None:
    base = ["--coordinator", "127.0.0.1:1", "--name", "web-1", "--state", str(tmp_path / "s")]
    neither = agent(*base, "--join-token", "jmj_x", env={"PATH": "/usr/bin:/bin"})
    assert neither.returncode == USAGE
    assert "--ca-file" in neither.stderr
    assert "--insecure" in neither.stderr
    # The flag beats the environment: --ca-file wins over JITMESH_INSECURE=1 (the file is
    # missing, so the agent says so instead of connecting in plain text).
    pinned = agent(
        *base, "--ca-file", str(tmp_path / "ca.pem"), "--join-token", "jmj_x",
        env={"PATH": "/usr/bin:/bin", "JITMESH_INSECURE": "1"},
    )  # fmt: skip
    assert pinned.returncode == USAGE
    assert "ca_file" in pinned.stderr or "CA" in pinned.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.subprocess
async def test_agent_process_enrolls_applies_and_stops_on_sigterm(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    state = tmp_path / "state"
    async with serving() as coordinator:
        proc = await asyncio.create_subprocess_exec(
            AGENT_BIN, "run",
            "--coordinator", coordinator.address,
            "--name", "web-1",
            "--label", "env=test",
            "--state", str(state),
            "--enforcer", f"file:{markers}",
            "--backoff-base", "0.05",
            "--backoff-cap", "0.2",
            env={"PATH": "/usr/bin:/bin", "JITMESH_JOIN_TOKEN": "join-1", "JITMESH_INSECURE": "1"},
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            session = await coordinator.session()
            assert session.hello.agent == "web-1"
            now = datetime.now(UTC)
            grant_id = gid()
            ack = await session.command(grant_body(1, grant_id, now, now + timedelta(hours=1)))
            assert ack.grant_id == grant_id
            assert (markers / "alice:deploy").exists()
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                _, stderr = await proc.communicate()
                await session.ended.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0
    logs = stderr.decode()
    assert "join-1" not in logs
    assert "cred-1" not in logs
    applied = [line for line in logs.splitlines() if 'msg="grant applied"' in line]
    assert len(applied) == 1
    fields = dict(part.split("=", 1) for part in applied[0].split() if "=" in part)
    assert (fields["agent"], fields["grant_id"], fields["subject"], fields["action"]) == (
        "web-1",
        grant_id,
        "alice",
        "deploy",
    )
    # Stopped, not revoked: the lease table still allows it, and the marker is still there.
    assert check(state, "alice", "deploy").returncode == ALLOWED
    assert json.loads((markers / "alice:deploy").read_text())["subject"] == "alice"


def test_a_missing_hooks_file_is_named_with_its_path(tmp_path: Path) -> None:
    hooks = tmp_path / "etc" / "hooks.yaml"
    done = agent(
        *("--coordinator", "127.0.0.1:1", "--insecure", "--name", "web-1"),
        *("--state", str(tmp_path / "state"), "--join-token-file", str(tmp_path / "none")),
        *("--enforcer", f"exec:{hooks}"),
    )
    assert done.returncode == USAGE
    assert f"cannot read exec hooks file {hooks} (No such file or directory)" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_hook_program_that_is_missing_is_named(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks.yaml"
    hooks.write_text("apply: [/opt/nowhere/grant-access, '{subject}']\nremove: [/bin/true]\n")
    hooks.chmod(0o600)
    done = agent(
        *("--coordinator", "127.0.0.1:1", "--insecure", "--name", "web-1"),
        *("--state", str(tmp_path / "state"), "--enforcer", f"exec:{hooks}"),
    )
    assert done.returncode == USAGE
    assert "exec hook program /opt/nowhere/grant-access not found or not executable" in (
        done.stderr
    )
