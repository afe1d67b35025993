"""`jitmesh-agent check` as a pam_exec account module, with Debian's PAM and pamtester."""

from __future__ import annotations

from pathlib import Path

from tests.host import sandbox


def test_a_login_is_allowed_with_a_grant_and_refused_without(tmp_path: Path) -> None:
    seen = sandbox.run(tmp_path, "pam_login")
    assert seen["without"] != 0
    assert seen["with"] == 0
    assert seen["other_user"] != 0
    assert seen["other_action_only"] != 0
    # With the agent down the lease table still answers (root's check), by not_after.
    assert seen["agent_down"] == 0
    assert seen["agent_down_bob"] != 0
