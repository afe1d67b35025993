"""A running `jitmesh-agent` (file enforcer, no TLS) keeps the libraries it does not need out of
its memory: no pydantic, no cryptography, no YAML parser, no migration tool, no package-metadata
reader (docs/performance.md, agent footprint). Python lists every import of the real process on
stderr (PYTHONPROFILEIMPORTTIME), from start-up, first migration and enrollment to a grant.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest

from jitmesh import Client, GrantState

from .procs import BIN, Proc, coordinator, free_port, read_env, wait_for, wait_healthy

pytestmark = pytest.mark.subprocess

NOT_IN_THE_AGENT = (
    # The metrics exporter loads only with --metrics-listen; --print-config alone writes TOML.
    "prometheus_client",
    "tomli_w",
    "click",
    "rich",
    "pydantic",
    "pydantic_core",
    "cryptography",
    "ruamel",
    "yoyo",
    "sqlparse",
    "importlib.metadata",
    "email",
)


async def test_agent_process_loads_no_heavy_libraries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    coord = coordinator(tmp_path / "coordinator", port)
    access = tmp_path / "access"
    access.mkdir()
    coord.start()
    web: Proc | None = None
    try:
        await wait_healthy(address)
        await wait_for(lambda: (tmp_path / "coordinator" / "dev.env").exists(), 20, "dev.env")
        env = read_env(tmp_path / "coordinator" / "dev.env")
        web = Proc(
            [str(BIN / "jitmesh-agent"), "--coordinator", address, "--name", "web-1",
             "--label", "env=staging", "--join-token", env["JITMESH_JOIN_TOKEN"],
             "--state", str(tmp_path / "web-1"), "--enforcer", f"file:{access}"],
            tmp_path / "web-1.log",
        )  # fmt: skip
        # Only the agent's environment: the coordinator is already running.
        monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
        web.start()
        monkeypatch.delenv("PYTHONPROFILEIMPORTTIME")
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ALICE"]) as alice:
            async with asyncio.timeout(20):
                while not any(a.name == "web-1" and a.connected for a in await alice.list_agents()):
                    await asyncio.sleep(0.05)
            request, grant = await alice.create_request(
                agent="web-1", action="deploy", duration=timedelta(minutes=5)
            )
            assert grant is not None
            await alice.wait_for_request(
                request.id, until=lambda r: r.grant_state is GrantState.ACTIVE, timeout=20
            )
        assert (access / "alice:deploy").exists()
        web.stop()
        modules = {
            line.rpartition("|")[2].strip()
            for line in web.log.read_text().splitlines()
            if line.startswith("import time:")
        }
        assert "grpc" in modules  # the listing works
        heavy = {
            m for m in modules if any(m == n or m.startswith(f"{n}.") for n in NOT_IN_THE_AGENT)
        }
        assert sorted(heavy) == []
    finally:
        if web is not None:
            web.stop()
        coord.stop()
