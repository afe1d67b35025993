"""Test hooks do not ship as live switches (issue 10, item 6).

The fault suite kills processes at named steps and moves an agent's wall clock; it does so through
launchers in tests/support/ that build the real programs with those faults passed in. The
installed programs read no variable that could put them in test mode, and the shipped packages
hold no test support (the swarm, the in-memory enforcer, the movable clock, crash points).
"""

from __future__ import annotations

import ast
import asyncio
import fnmatch
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest

from jitmesh import Client, GrantState
from tests.e2e.procs import agent, check, coordinator, free_port, read_env, wait_for, wait_healthy

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[2]
# The variables that switched test behaviour on in earlier versions.
OLD_SWITCHES = ("JITMESH_TEST_CRASH_AT", "JITMESH_TEST_CLOCK_OFFSET_FILE")
TEST_SUPPORT = {"swarm", "testclock", "crashpoints"}
TEST_CLASSES = {"Swarm", "SwarmSettings", "MemoryEnforcer", "OffsetFileClock"}


def shipped_modules() -> dict[str, Path]:
    """Every Python module the wheel installs: pyproject.toml's package patterns, matched as
    setuptools matches them (namespace packages included, its default)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    modules: dict[str, Path] = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if any(part.startswith(".") for part in parts) or len(parts) < 2:
            continue
        package = ".".join(parts[:-1])
        if any(fnmatch.fnmatchcase(package, pattern) for pattern in include):
            modules[f"{package}.{path.stem}"] = path
    return modules


def test_shipped_packages_hold_no_test_support() -> None:
    modules = shipped_modules()
    # The finder really sees the shipped code (and nothing of tests/ or bench/).
    assert {"agent.app", "server.app", "jitmesh.client", "agent.engine.commands"} <= set(modules)
    assert not [m for m in modules if m.split(".")[0] in ("tests", "bench")]
    assert not [m for m in modules if m.rsplit(".", 1)[-1] in TEST_SUPPORT]
    found = []
    for name, path in modules.items():
        source = path.read_text()
        tree = ast.parse(source)
        classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        found += [f"{name}: class {c}" for c in classes & TEST_CLASSES]
        found += [f"{name}: reads {v}" for v in OLD_SWITCHES if v in source]
        found += [f"{name}: imports tests" for n in ast.walk(tree) if _imports_tests(n)]
    assert found == []


def _imports_tests(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return (node.module or "").split(".")[0] in ("tests", "bench")
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[0] in ("tests", "bench") for alias in node.names)
    return False


async def test_installed_programs_ignore_the_old_test_switches(tmp_path: Path) -> None:
    """A coordinator and an agent started with the old variables set (a crash point at the first
    step of an approval and of an apply; the agent's clock a day ahead, with a 2 s skew
    tolerance) serve a grant to the end and stay up: none of it takes effect."""
    clock_file = tmp_path / "clock"
    clock_file.write_text("86400\n")
    port = free_port()
    address = f"127.0.0.1:{port}"
    coord = coordinator(tmp_path / "coordinator", port)
    coord.env = {"JITMESH_TEST_CRASH_AT": "before_commit"}
    access = tmp_path / "access"
    access.mkdir()
    state = tmp_path / "web-1"
    web = None
    coord.start()
    try:
        await wait_healthy(address)
        await wait_for(lambda: (tmp_path / "coordinator" / "dev.env").exists(), 20, "dev.env")
        env = read_env(tmp_path / "coordinator" / "dev.env")
        web = agent(
            address, "web-1", "env=staging", env["JITMESH_JOIN_TOKEN"], state, access,
            "--insecure", "--skew-tolerance", "2",
        )  # fmt: skip
        web.env = {
            "JITMESH_TEST_CRASH_AT": "agent_after_record",
            "JITMESH_TEST_CLOCK_OFFSET_FILE": str(clock_file),
        }
        web.start()
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ALICE"]) as alice:
            await wait_for_agent(alice, "web-1")
            request, grant = await alice.create_request(
                agent="web-1", action="deploy", duration=timedelta(minutes=30)
            )
            assert grant is not None, request
            done = await alice.wait_for_request(
                request.id, until=lambda r: r.grant_state is GrantState.ACTIVE, timeout=20
            )
            assert done.grant_state is GrantState.ACTIVE
        assert (access / "alice:deploy").exists()
        assert check(state, "alice", "deploy") == 0
        assert coord.running, coord.log.read_text()[-2000:]
        assert web.running, web.log.read_text()[-2000:]
        assert "crash point" not in web.log.read_text() + coord.log.read_text()
    finally:
        if web is not None:
            web.stop()
        coord.stop()


async def wait_for_agent(client: Client, name: str) -> None:
    async with asyncio.timeout(20):
        while not any(a.name == name and a.connected for a in await client.list_agents()):
            await asyncio.sleep(0.05)
