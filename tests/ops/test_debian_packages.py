"""scripts/test installs the Debian packages some tests drive in one place (scripts/_debian):
one list, one apt-get update and one apt-get install when root; otherwise it prints exactly the
command that installs what is missing instead of skipping silently. Run with a stub apt-get and
id on PATH and no programs found."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[2]
ALL = (
    "systemd sudo passwd openssh-server openssh-client pamtester iproute2 procps chromium "
    "nodejs npm"
)


def _run(tmp_path: Path, uid: int) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "calls"
    (stubs / "apt-get").write_text(f'#!/bin/sh\necho "apt-get $*" >> {calls}\n')
    (stubs / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    empty = tmp_path / "nothing"
    empty.mkdir()
    done = subprocess.run(
        [
            "bash",
            "-c",
            f"set -euo pipefail; source {ROOT / 'scripts' / '_debian'}; install_debian_packages",
        ],
        env={
            "PATH": f"{stubs}:{os.environ['PATH']}",
            "DEBIAN_PROGRAM_PATH": str(empty),
            "APT_LOG": str(tmp_path / "apt.log"),
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done, calls.read_text().splitlines() if calls.exists() else []


def test_as_root_one_update_and_one_install_of_every_missing_package(tmp_path: Path) -> None:
    done, calls = _run(tmp_path, 0)
    assert done.returncode == 0, done.stderr
    assert calls == [
        "apt-get update -qq",
        f"apt-get install -y -qq --no-install-recommends {ALL}",
    ]
    assert done.stderr == f"bootstrap: installing {ALL}\n"


def test_otherwise_it_says_exactly_what_to_install(tmp_path: Path) -> None:
    done, calls = _run(tmp_path, 1000)
    assert done.returncode == 0, done.stderr
    assert calls == []
    assert done.stderr.splitlines() == [
        "scripts/test: some tests need Debian packages that are missing; install them with:",
        f"  sudo apt-get install -y --no-install-recommends {ALL}",
    ]


def test_scripts_test_has_no_other_apt_get() -> None:
    text = (ROOT / "scripts" / "test").read_text()
    assert "apt-get" not in text
    assert "install_debian_packages" in text
