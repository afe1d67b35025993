"""The cluster epoch (generation) of replicas on PostgreSQL: shared, not raised when a replica
starts (agents accept commands from any replica), and raised by `jitmesh-coordinator fence` (the
installed console script, a real process) after a restore from a backup, so that every replica
started afterwards signs with the higher epoch and agents refuse the rewound history's
commands (tests/agent/test_verify.py: an earlier epoch is refused)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jitmesh.clock import FakeClock
from server.app import Coordinator, build
from server.config import CoordinatorConfig
from server.domain.policy import DEV_POLICY
from server.shared import new_key
from tests.store.test_migrate_store import run
from tests.support import postgres


async def replica(tmp_path: Path, dsn: str, name: str, **settings: Any) -> Coordinator:
    """A coordinator replica built in this process on `dsn`, sharing `tmp_path`'s secret key
    with the others; `settings`: more CoordinatorConfig fields."""
    key_file = tmp_path / "secret.key"
    if not key_file.exists():
        key_file.write_text(new_key())
    config = CoordinatorConfig(
        data_dir=tmp_path / name,
        port=0,
        default_policy=DEV_POLICY,
        store=dsn,
        replica=name,
        secret_key_file=key_file,
        **settings,
    )
    return await build(config, clock=FakeClock())


async def test_replicas_share_one_epoch_that_only_fence_raises(tmp_path: Path) -> None:
    async with postgres.fresh_schema() as dsn:
        started = []
        for name in ("ra", "rb", "ra-again"):
            coordinator = await replica(tmp_path, dsn, name)
            started.append(coordinator.epoch)
            await coordinator.stop()
        # The first start sets it; later starts (another replica, a restart) keep it.
        assert started == [1, 1, 1]
        code, out, err = await run("fence", "--store", dsn, env={})
        assert code == 0, err
        assert out.strip() == "cluster epoch is now 2"
        coordinator = await replica(tmp_path, dsn, "rb")
        try:
            assert coordinator.epoch == 2
        finally:
            await coordinator.stop()
