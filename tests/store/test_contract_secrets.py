"""Key material shared by replicas (server/shared.py), on every store: replicas starting at once
on an empty store each make signing keys and a CA; one set wins whole, and every other replica
takes it before it serves (a replica keeping its own CA would present a certificate nobody
trusts). On PostgreSQL the replicas are separate store objects claiming at the same moment."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from jitmesh.clock import FakeClock
from server.domain.ports import Store
from server.shared import SHARED_FILES, SecretKeyError, SharedFiles, new_key
from tests.server.helpers import T0
from tests.store.conftest import Opener
from tests.store.test_contract_shared import replicas


def made_here(data: Path, mark: str) -> None:
    """What a replica makes at start on an empty store: its own keys and CA."""
    for name in SHARED_FILES:
        path = data / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{name} made by {mark}\n")


def files(data: Path) -> dict[str, str]:
    return {name: (data / name).read_text() for name in SHARED_FILES}


async def test_secrets_are_added_all_or_none(store: Store) -> None:
    assert await store.add_secrets([("a", b"1"), ("b", b"2")], T0)
    # One of them is stored already: none of these is, "c" included.
    assert not await store.add_secrets([("c", b"3"), ("b", b"other")], T0)
    assert (await store.get_secret("b"), await store.get_secret("c")) == (b"2", None)


async def test_a_replica_starting_after_another_uploaded_takes_its_files(
    store: Store, reopen: Opener, tmp_path: Path
) -> None:
    box = Fernet(new_key())
    a, b = await replicas(store, reopen, 2)
    clock = FakeClock(T0)
    first, second = SharedFiles(a, tmp_path / "ra", box), SharedFiles(b, tmp_path / "rb", box)
    # Both found the store empty at start (sync) and made their own keys and CA.
    assert await first.sync(clock) == []
    assert await second.sync(clock) == []
    made_here(tmp_path / "ra", "ra")
    made_here(tmp_path / "rb", "rb")
    assert not await first.claim_missing(clock)
    # rb claims after ra's upload: it must take ra's files, all of them, before it serves.
    assert await second.claim_missing(clock)
    assert files(tmp_path / "rb") == files(tmp_path / "ra")
    for name in SHARED_FILES:
        stored = await store.get_secret(name)
        assert stored is not None
        assert box.decrypt(stored).decode() == f"{name} made by ra\n"


async def test_replicas_claiming_at_once_end_with_one_set(
    store: Store, reopen: Opener, tmp_path: Path
) -> None:
    box = Fernet(new_key())
    stores = await replicas(store, reopen, 4)
    clock = FakeClock(T0)
    shared = [SharedFiles(s, tmp_path / f"r{i}", box) for i, s in enumerate(stores)]
    for i, one in enumerate(shared):
        await one.sync(clock)
        made_here(tmp_path / f"r{i}", f"r{i}")
    lost = await asyncio.gather(*(one.claim_missing(clock) for one in shared))
    assert sorted(lost) == [False, True, True, True]
    winner = f"r{lost.index(False)}"
    for i in range(4):
        # One replica's set, whole: never one replica's signing keys beside another's CA.
        assert set(files(tmp_path / f"r{i}").values()) == {
            f"{name} made by {winner}\n" for name in SHARED_FILES
        }


async def test_moving_in_never_replaces_the_data_directorys_keys(
    store: Store, tmp_path: Path
) -> None:
    box = Fernet(new_key())
    clock = FakeClock(T0)
    made_here(tmp_path / "other", "other")
    assert not await SharedFiles(store, tmp_path / "other", box).claim_missing(clock)
    made_here(tmp_path / "old", "old")
    with pytest.raises(SecretKeyError, match="empty database"):
        await SharedFiles(store, tmp_path / "old", box).claim_missing(clock, adopt=False)
    assert set(files(tmp_path / "old").values()) == {f"{n} made by old\n" for n in SHARED_FILES}
