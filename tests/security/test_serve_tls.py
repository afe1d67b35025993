"""`jitmesh-coordinator serve` as a process: TLS from its internal CA unless `--insecure`;
`jitctl` talks to it only with the CA pinned."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_serve_uses_tls_and_jitctl_needs_the_ca(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "jitmesh-coordinator"),
        "serve",
        "--data",
        str(data),
        "--listen",
        "127.0.0.1:0",
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    address = ca_file = ""
    try:
        async with asyncio.timeout(30):
            while not (address and ca_file):
                line = (await proc.stderr.readline()).decode()
                assert line, "coordinator exited"
                # Structured lines: msg="coordinator listening" address=HOST:PORT epoch=N
                if "coordinator listening" in line and (m := re.search(r" address=(\S+)", line)):
                    address = m.group(1)
                if m := re.search(r"ca_file=(\S+)", line):
                    ca_file = m.group(1)
        env = {
            "JITMESH_COORDINATOR": address,
            "JITMESH_TOKEN": (data / "admin.token").read_text().strip(),
        }
        code, out = await run(str(BIN / "jitctl"), "agent", "list", env=env)
        assert code != 0, out  # plain text to a TLS port
        code, out = await run(
            str(BIN / "jitctl"), "agent", "list", env={**env, "JITMESH_CA_FILE": ca_file}
        )
        assert code == 0, out
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await proc.wait()


async def test_serve_refuses_half_a_tls_configuration(tmp_path: Path) -> None:
    code, out = await run(
        str(BIN / "jitmesh-coordinator"),
        "serve",
        "--data",
        str(tmp_path),
        "--tls-cert",
        str(tmp_path / "cert.pem"),
    )
    assert code == 2
    assert "--tls-cert and --tls-key go together" in out


async def test_limits_out_of_range_are_refused_with_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for flag, value in (
        ("--enroll-rate", "0"),
        ("--enroll-burst", "0"),
        ("--request-rate", "-1"),
        ("--enroll-overall-rate", "0"),
    ):
        code, out = await run(
            str(BIN / "jitmesh-coordinator"), "serve", "--data", str(data), flag, value
        )
        assert code == 2
        assert out.startswith(f"jitmesh-coordinator: {flag}: ")
        assert len(out.splitlines()) == 1
        assert "Traceback" not in out
    assert not data.exists()
