"""The group enforcer with Debian's gpasswd, in a private mount namespace."""

from __future__ import annotations

from pathlib import Path

from tests.host import sandbox


def test_membership_follows_grants_and_drift_is_removed(tmp_path: Path) -> None:
    seen = sandbox.run(tmp_path, "group_enforcer")
    assert seen["deploy"] == [["alice"], ["alice"]]
    assert set(seen["id"].split()) >= {"deployers", "builders"}
    # deploy and build share builders: it stays while build still holds.
    assert seen["after_deploy_removed"] == [[], ["alice"]]
    assert seen["after_both_removed"] == [[], []]
    # mallory added to builders by hand: the engine's reconcile takes it away, audited.
    assert seen["engine_applied"] == ["alice", "mallory"]
    assert seen["after_reconcile"] == ["alice"]
    assert seen["events"] == [["drift.removed", {"enforcer": "group"}]]
