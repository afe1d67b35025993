"""The README's "Running it for real (TLS)" walkthrough works when pasted as written (issue 10
item 17): its shell block is run by bash in an empty directory with a fresh home, on loopback.

The only changes made to the text: the ports 7443/7444 become free ones and 0.0.0.0 becomes
127.0.0.1 (this test may not take fixed ports or listen on every interface). Commands the README
marks "In another terminal" are started in the background, and the next command waits until
each is ready (the coordinator: its admin token written and its port open; an agent: listed as
connected), as a person would before going on."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from agent.config import parse_exec_hooks

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent

# What "ready" means for each program the walkthrough keeps running (bash conditions).
READY = {
    "jitmesh-coordinator": (
        "test -s jit/coordinator/admin.token && "
        'python3 -c \'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])),'
        " 1)' {port}"
    ),
    "jitmesh-agent": (
        "jitctl agent list -o json | python3 -c 'import json, sys; "
        'sys.exit(not any(a["connected"] for a in json.load(sys.stdin)))\''
    ),
}
PRELUDE = """\
set -euo pipefail
__wait() {  # poll a condition (60 s at most), as a person watching the other terminal would
  for _ in $(seq 600); do
    if eval "$1" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "not ready after 60s: $1" >&2
  return 1
}
"""


def walkthrough() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Running it for real (TLS)", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```sh\n(.*?)```", section, re.S)
    assert found is not None, "the TLS walkthrough has no sh block"
    return found.group(1)


def commands(block: str) -> list[tuple[str, bool]]:
    """(command, keeps running) in order: continuation lines joined, here-documents kept whole,
    comment lines dropped (a comment saying "In another terminal" marks the next command)."""
    out: list[tuple[str, bool]] = []
    lines = block.splitlines()
    background = False
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            background = background or "in another terminal" in line.lower()
            continue
        command = line
        while command.endswith("\\"):
            command = command[:-1] + lines[i].strip()
            i += 1
        heredoc = re.search(r"<<'?(\w+)'?", command)
        if heredoc:
            end = heredoc.group(1)
            body = []
            while lines[i] != end:
                body.append(lines[i])
                i += 1
            i += 1
            command = "\n".join([command, *body, end])
        out.append((command, background))
        background = False
    return out


def _two_free_ports() -> int:
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two consecutive free ports")


def script(port: int) -> str:
    parts = [PRELUDE]
    for n, (command, background) in enumerate(commands(walkthrough())):
        command = (
            command.replace("7443", str(port))
            .replace("7444", str(port + 1))
            .replace("0.0.0.0", "127.0.0.1")  # noqa: S104 (the text replaced, never bound)
        )
        if not background:
            parts.append(command)
            continue
        program = command.split()[0]
        assert program in READY, f"no readiness check for {program}"
        parts.append(f"( exec {command} ) > bg-{n}.log 2>&1 &")
        parts.append("echo $! >> background.pids")
        parts.append(f"__wait {_quote(READY[program].format(port=port))}")
    return "\n".join(parts) + "\n"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def test_the_walkthrough_has_the_steps_the_issue_asks_for() -> None:
    found = commands(walkthrough())
    running = [c.split()[0] for c, background in found if background]
    assert running == ["jitmesh-coordinator", "jitmesh-agent"]
    serve = next(c for c, _ in found if c.startswith("jitmesh-coordinator serve"))
    assert "--policy jit/policy.yaml" in serve
    assert "--tls-name" in serve
    assert any(c.startswith("cat > jit/hooks.yaml") for c, _ in found)


@pytest.mark.subprocess
def test_the_tls_walkthrough_ends_in_a_working_grant(tmp_path: Path) -> None:
    port = _two_free_ports()
    work = tmp_path / "work"
    work.mkdir()
    (work / "walkthrough.sh").write_text(script(port))
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITMESH_")}
    env.update(
        PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        HOME=str(tmp_path / "home"),
        XDG_CONFIG_HOME=str(tmp_path / "home" / ".config"),
    )
    try:
        done = subprocess.run(
            ["bash", "walkthrough.sh"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        if done.returncode == 0:
            _wrong_or_missing_ca_file_says_what_to_do(work, env, port, tmp_path)
    finally:
        pids = work / "background.pids"
        for pid in pids.read_text().split() if pids.exists() else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in work.glob("bg-*.log"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs
    assert "is active on web-1" in done.stdout
    assert (work / "jit" / "access" / "alice.deploy").exists()
    assert "allowed: grant grt-" in done.stdout
    # The names the README says the server certificate covers.
    cert = x509.load_pem_x509_certificate((work / "jit/coordinator/ca/server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(names.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    assert {"localhost", "jit.example.com"} <= dns
    assert {"127.0.0.1", "::1"} <= ips


def test_the_hooks_file_reference_parses() -> None:
    text = (ROOT / "docs" / "host.md").read_text()
    section = text.split("## The `exec` enforcer's hooks file", 1)[1]
    found = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert found is not None
    hooks = parse_exec_hooks(found.group(1))
    assert hooks.apply == ("/usr/local/sbin/grant-deploy", "{subject}", "{action}")
    assert hooks.observe == ("/usr/local/sbin/list-access",)
    assert dict(hooks.env) == {"APP_ENV": "prod"}


def _wrong_or_missing_ca_file_says_what_to_do(
    work: Path, env: dict[str, str], port: int, tmp_path: Path
) -> None:
    """Item 9, seen from outside: jitctl against the walkthrough's TLS coordinator with another
    CA, or a CA file that is not there, names --ca-file / JITMESH_CA_FILE and says what failed
    (was `UNAVAILABLE: Socket closed` and C-core lines)."""
    other = tmp_path / "other-ca.pem"
    other.write_bytes(_self_signed_ca())
    token = (work / "jit/coordinator/admin.token").read_text().strip()
    base = {**env, "JITMESH_COORDINATOR": f"localhost:{port}", "JITMESH_TOKEN": token}
    for ca_file, code, words in (
        (str(other), 6, ("did not verify", "--ca-file", "JITMESH_CA_FILE")),
        (str(tmp_path / "missing.pem"), 2, ("cannot read the CA file", "--ca-file")),
    ):
        done = subprocess.run(
            ["jitctl", "agent", "list"],
            cwd=work,
            env={**base, "JITMESH_CA_FILE": ca_file},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == code, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        for word in words:
            assert word in done.stderr, done.stderr
        assert "Socket closed" not in done.stderr
        assert token not in done.stderr


def _self_signed_ca() -> bytes:
    from datetime import UTC, datetime, timedelta

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "another CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)
