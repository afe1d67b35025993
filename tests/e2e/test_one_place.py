"""One process per place (issue 10, item 7) and private data files (item G): a second coordinator
on the same port or the same data directory exits with a message naming the first; the data
directory's files are 0600."""

from __future__ import annotations

import asyncio
import stat
import subprocess
from pathlib import Path

import pytest
from pydantic import SecretStr

from agent import app as agent_app
from agent.config import AgentConfig, FileEnforcerConfig
from agent.domain.errors import EnrollmentRefused
from server.app import build
from server.config import CoordinatorConfig

from .conftest import JOIN_TOKEN, Mesh
from .procs import BIN, coordinator, free_port, wait_for


async def _second(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a second coordinator; it must exit on its own (a test timeout otherwise)."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "jitmesh-coordinator"),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("the second coordinator kept running beside the first") from None
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


@pytest.mark.subprocess
async def test_a_second_coordinator_cannot_share_the_port_or_the_data_directory(
    tmp_path: Path,
) -> None:
    port = free_port()
    first = coordinator(tmp_path / "first", port)
    first.start()
    try:
        await wait_for(lambda: (tmp_path / "first" / "dev.env").exists(), 20, "dev.env")
        assert first.popen is not None

        same_port = await _second(
            "dev", "--data", str(tmp_path / "second"), "--listen", f"127.0.0.1:{port}"
        )
        assert same_port.returncode == 1
        lines = same_port.stderr.strip().splitlines()
        assert lines[-1].startswith(f"jitmesh-coordinator: cannot listen on 127.0.0.1:{port}")
        assert "in use" in lines[-1]
        assert "Traceback" not in same_port.stderr

        same_data = await _second(
            "dev", "--data", str(tmp_path / "first"), "--listen", f"127.0.0.1:{free_port()}"
        )
        assert same_data.returncode == 1
        assert f"another coordinator (pid {first.popen.pid}) is running" in same_data.stderr
        # The first one still serves, untouched.
        assert first.popen.poll() is None
    finally:
        first.stop()
    # Once it is gone (even killed), the directory is free again: the kernel drops the lock.
    again = coordinator(tmp_path / "first", port)
    again.start()
    try:
        log = tmp_path / "first.log"
        await wait_for(lambda: log.read_text().count("dev mode ready") == 2, 20, "a restart")
    finally:
        again.stop()


async def test_the_data_directory_and_its_files_are_private(tmp_path: Path) -> None:
    data = tmp_path / "coordinator"
    for _ in range(2):
        built = await build(CoordinatorConfig(data_dir=data, port=0))
        try:
            async with built.store.transaction() as tx:
                await tx.set_meta("probe", "1")  # the WAL and its index exist now
            names = {p.name for p in data.rglob("*")}
            assert {"coordinator.db", "coordinator.db-wal", "coordinator.db-shm"} <= names
            for path in [data, *data.rglob("*")]:
                mode = stat.S_IMODE(path.stat().st_mode)
                assert mode & 0o077 == 0, f"{path.relative_to(tmp_path)} is {mode:o}"
        finally:
            await built.stop()
        # A database made before this rule (0644) is tightened on the next start.
        (data / "coordinator.db").chmod(0o644)


async def test_a_second_dev_agent_with_a_connected_agents_name_is_refused(mesh: Mesh) -> None:
    first = await mesh.start_agent("web-1", "prod")
    config = AgentConfig(
        coordinator=mesh.address,
        name="web-1",
        join_token=SecretStr(JOIN_TOKEN),
        insecure=True,
        state_dir=mesh.root / "web-1-second",
        enforcers=(FileEnforcerConfig(directory=mesh.root / "second-access"),),
        backoff_base=0.05,
        backoff_cap=0.2,
    )
    (mesh.root / "second-access").mkdir()
    with pytest.raises(EnrollmentRefused, match="web-1 is connected now"):
        async with asyncio.timeout(30):
            await agent_app.run(config)
    # The first keeps its name and its stream.
    assert not first.task.done()
    assert mesh.coordinator.registry.connected("web-1")
    events = await mesh.client("admin").list_audit(kind="agent.enroll_refused")
    assert [e.agent for e in events] == ["web-1"]
