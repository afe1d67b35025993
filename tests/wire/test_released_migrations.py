"""Migrations add, never rename (docs/wire.md, "Mixed versions"): yoyo knows a migration by its
file name, so a database made by a released revision opens only while every migration file of
that revision is still there, under the same name and with the same text (an edited one would
leave released databases with another schema than new ones). No migration renames or drops a
table or column (a yoyo `.rollback.sql` may). The released files are read from this
repository's history, as in test_compat.py."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.wire.test_compat import RELEASES, ROOT

DIRECTORIES = (
    "server/store/migrations",
    "server/store/postgres/migrations",
    "agent/store/migrations",
)


def _released_files(commit: str) -> list[str]:
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", commit, "--", *DIRECTORIES],
        capture_output=True,
        text=True,
        check=False,
    )
    if listed.returncode != 0:
        pytest.fail(f"commit {commit} is not in this clone: the test needs full git history")
    return [name for name in listed.stdout.split() if name.endswith(".sql")]


@pytest.mark.parametrize(("version", "commit"), sorted(RELEASES.items()))
def test_released_migrations_are_kept_as_they_were(version: str, commit: str) -> None:
    files = _released_files(commit)
    assert files, f"no migration files found at {commit}"
    problems: list[str] = []
    for name in files:
        now = ROOT / name
        if not now.exists():
            problems.append(f"{name} (released in {version}) was removed or renamed")
            continue
        then = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{commit}:{name}"], capture_output=True, check=True
        ).stdout
        if now.read_bytes() != then:
            problems.append(f"{name} (released in {version}) was edited: add a new migration")
    assert problems == []


def test_no_migration_renames_or_drops() -> None:
    found = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for directory in DIRECTORIES
        for path in sorted((ROOT / directory).glob("*.sql"))
        if not path.name.endswith(".rollback.sql")  # yoyo's rollbacks undo: they may drop
        for line in path.read_text().splitlines()
        if re.search(r"\b(RENAME|DROP)\b", line.split("--", 1)[0], re.IGNORECASE)
    ]
    assert found == []
