"""The coordinator's migrations, as yoyo reads them (issue 10 item 14): yoyo knows a migration by
its file name, so an applied one is never renamed, and two files may share a number. Their order
is then made explicit: the migration after the two numbered 0002 depends on both, every
dependency named exists and comes earlier, and yoyo applies the files in the order of their
names, in both stores."""

from __future__ import annotations

from pathlib import Path

import pytest
from yoyo import read_migrations
from yoyo.migrations import topological_sort

ROOT = Path(__file__).parents[2]
SQLITE = ROOT / "server" / "store" / "migrations"
POSTGRES = ROOT / "server" / "store" / "postgres" / "migrations"


def _depends(directory: Path) -> dict[str, set[str]]:
    return {m.id: {d.id for d in m.depends} for m in read_migrations(str(directory))}


def test_the_migration_after_the_two_0002s_depends_on_both() -> None:
    depends = _depends(SQLITE)
    twos = {name for name in depends if name.startswith("0002.")}
    assert twos == {"0002.enrollment-and-certificates", "0002.locks"}
    assert depends["0003.join-token-revocation"] >= twos
    threes = [name for name in depends if name.startswith("0003.")]
    assert any(depends[name] >= twos for name in threes)


@pytest.mark.parametrize("directory", [SQLITE, POSTGRES], ids=["sqlite", "postgres"])
def test_migrations_apply_in_the_order_of_their_names(directory: Path) -> None:
    depends = _depends(directory)
    assert depends, f"no migrations in {directory}"
    for name, needs in depends.items():
        for need in needs:
            assert need in depends, f"{name} depends on {need}, which does not exist"
            assert need < name, f"{name} depends on {need}, which comes after it"
    applied = [m.id for m in topological_sort(read_migrations(str(directory)))]
    assert applied == sorted(depends)
