"""The exec enforcer with real small scripts."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from agent.domain.errors import EnforcerError, HookFailed, HookTimeout
from agent.enforcers.base import Enforcer
from agent.enforcers.exec import ExecEnforcer, Hooks
from tests.agent.factories import cover


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def recording_hooks(tmp_path: Path, **changes: object) -> Hooks:
    log = tmp_path / "calls.log"
    hook = script(
        tmp_path, "hook.sh", 'echo "$1 $2 $3 $JITMESH_SUBJECT $JITMESH_ACTION" >> "$LOG"\n'
    )
    hooks = Hooks(
        apply=(hook, "apply", "--user={subject}", "{action}"),
        remove=(hook, "remove", "--user={subject}", "{action}"),
        env={"LOG": str(log)},
    )
    return Hooks(**{**hooks.__dict__, **changes}) if changes else hooks


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited child nobody reaped yet still has a pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


async def wait_gone(pid: int) -> None:
    """Wait (without sleeping) until process `pid` has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(fd, exited.set_result, None)
    try:
        async with asyncio.timeout(5):
            await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def test_exec_enforcer_implements_the_interface(tmp_path: Path) -> None:
    typed: Enforcer = ExecEnforcer(recording_hooks(tmp_path), name="exec:hooks.yaml")
    assert typed.name == "exec:hooks.yaml"


async def test_apply_and_remove_run_their_hooks_with_the_pair(tmp_path: Path) -> None:
    enforcer = ExecEnforcer(recording_hooks(tmp_path))
    await enforcer.apply(cover("alice", "deploy"))
    await enforcer.remove("alice", "deploy")
    assert (tmp_path / "calls.log").read_text().splitlines() == [
        "apply --user=alice deploy alice deploy",
        "remove --user=alice deploy alice deploy",
    ]


async def test_values_are_never_interpreted_by_a_shell(tmp_path: Path) -> None:
    out = tmp_path / "argv.json"
    dumper = tmp_path / "dump_argv.py"
    dumper.write_text("import json, sys\njson.dump(sys.argv[2:], open(sys.argv[1], 'w'))\n")
    hook = (sys.executable, str(dumper), str(out), "{subject};{action}", "$(id)", "`id`")
    enforcer = ExecEnforcer(Hooks(apply=hook, remove=hook))
    await enforcer.apply(cover("alice", "deploy"))
    assert json.loads(out.read_text()) == ["alice;deploy", "$(id)", "`id`"]


async def test_invalid_names_never_reach_a_hook(tmp_path: Path) -> None:
    enforcer = ExecEnforcer(recording_hooks(tmp_path))
    with pytest.raises(EnforcerError, match="subject is not valid"):
        await enforcer.apply(cover("alice; rm -rf /", "deploy"))
    assert not (tmp_path / "calls.log").exists()


async def test_nonzero_exit_raises_with_the_code_and_a_redacted_tail(tmp_path: Path) -> None:
    failing = script(tmp_path, "fail.sh", 'echo "token is $API_TOKEN, bad luck" >&2\nexit 3\n')
    enforcer = ExecEnforcer(
        Hooks(apply=(failing,), remove=(failing,), env={"API_TOKEN": "s3cr3t-canary"})
    )
    with pytest.raises(HookFailed) as caught:
        await enforcer.apply(cover("alice", "deploy"))
    assert caught.value.exit_code == 3
    assert "exited with code 3" in str(caught.value)
    assert "s3cr3t-canary" not in str(caught.value)
    assert "s3cr3t-canary" not in caught.value.tail
    assert caught.value.tail == "token is ***, bad luck"


async def test_missing_program_is_an_enforcer_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-hook")
    enforcer = ExecEnforcer(Hooks(apply=(missing,), remove=(missing,)))
    with pytest.raises(EnforcerError, match="could not start"):
        await enforcer.apply(cover("alice", "deploy"))


async def test_hanging_hook_is_killed_with_its_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    hang = script(tmp_path, "hang.sh", f'sleep 300 &\necho "$! $$" > {pids}\nwait\n')
    enforcer = ExecEnforcer(
        Hooks(apply=(hang,), remove=(hang,), timeout=timedelta(milliseconds=500))
    )
    with pytest.raises(HookTimeout, match="timed out"):
        await enforcer.apply(cover("alice", "deploy"))
    child, leader = (int(word) for word in pids.read_text().split())
    await wait_gone(child)
    await wait_gone(leader)
    assert not running(child)
    assert not running(leader)


async def test_cancelling_a_hook_kills_its_process_group(tmp_path: Path) -> None:
    fifo = tmp_path / "pids.fifo"
    os.mkfifo(fifo)
    hang = script(tmp_path, "hang.sh", f'sleep 300 &\necho "$! $$" > {fifo}\nwait\n')
    enforcer = ExecEnforcer(Hooks(apply=(hang,), remove=(hang,), timeout=timedelta(minutes=5)))
    task = asyncio.ensure_future(enforcer.apply(cover("alice", "deploy")))
    # Reading the FIFO blocks until the hook has written its pids: it is running.
    async with asyncio.timeout(5):
        words = (await asyncio.to_thread(fifo.read_text)).split()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(10):
            await task
    child, leader = (int(word) for word in words)
    await wait_gone(child)
    await wait_gone(leader)
    assert not running(child)
    assert not running(leader)


async def test_a_hook_that_leaves_a_process_behind_does_not_block(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # The leftover keeps the hook's stdout and stderr open; the agent must not wait for them.
    leave = script(tmp_path, "leave.sh", f'sleep 300 &\necho "$!" > {pids}\necho done\n')
    enforcer = ExecEnforcer(Hooks(apply=(leave,), remove=(leave,), timeout=timedelta(minutes=5)))
    try:
        async with asyncio.timeout(10):
            await enforcer.apply(cover("alice", "deploy"))
    finally:
        leftover = int(pids.read_text())
        os.kill(leftover, 9)
        await wait_gone(leftover)


async def test_hooks_get_a_fixed_environment_and_nothing_inherited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent/libcanary.so")
    monkeypatch.setenv("JITMESH_TEST_SECRET", "canary-secret")
    out = tmp_path / "env.json"
    dumper = tmp_path / "dump_env.py"
    dumper.write_text("import json, os, sys\njson.dump(dict(os.environ), open(sys.argv[1], 'w'))\n")
    hook = (sys.executable, str(dumper), str(out))
    enforcer = ExecEnforcer(Hooks(apply=hook, remove=hook, env={"HOOK_MODE": "strict"}))
    await enforcer.apply(cover("alice", "deploy"))
    env = json.loads(out.read_text())
    assert env == {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOOK_MODE": "strict",
        "JITMESH_SUBJECT": "alice",
        "JITMESH_ACTION": "deploy",
    }


async def test_observe_reads_pairs_and_skips_other_lines(tmp_path: Path) -> None:
    lister = script(
        tmp_path,
        "list.sh",
        'printf "alice deploy\\n\\nbob db.read\\nnot a pair line\\n../x y\\n"\n',
    )
    enforcer = ExecEnforcer(Hooks(apply=(lister,), remove=(lister,), observe=(lister,)))
    assert await enforcer.observe() == {("alice", "deploy"), ("bob", "db.read")}


async def test_observe_without_a_hook_sees_nothing(tmp_path: Path) -> None:
    enforcer = ExecEnforcer(recording_hooks(tmp_path))
    assert await enforcer.observe() == set()
    assert not (tmp_path / "calls.log").exists()
