"""The sudo enforcer with Debian's real sudo and visudo, in a private mount namespace."""

from __future__ import annotations

from pathlib import Path

from tests.host import sandbox
from tests.host.sandbox import assert_refused_on_time


def test_a_grant_allows_exactly_the_mapped_commands_until_sudo_itself_refuses(
    tmp_path: Path,
) -> None:
    seen = sandbox.run(tmp_path, "sudo_enforcer")
    assert seen["before"] != 0
    # The drop-in as sudo wants it: root's, 0440, UTC times with Z, the exact command.
    assert (seen["mode"], seen["owner"]) == ("0o440", 0)
    assert "NOTAFTER=" in seen["file"]
    assert "Z NOPASSWD: /usr/bin/id -u" in seen["file"]
    assert "/usr/bin/id -u" in seen["listed"]
    rc, out = seen["allowed"]
    assert (rc, out.splitlines()[-1]) == (0, "0")
    # Nothing else: other arguments, another command, another user.
    assert seen["other_args"] != 0
    assert seen["other_command"] != 0
    assert seen["bob"] != 0
    assert seen["observed"] == [["alice", "restart"]]
    # A rule added by hand to the managed drop-in: the file is taken away, never used.
    assert seen["observed_after_edit"] == []
    assert not seen["edited_file_left"]
    assert not seen["edited_rule_works"]
    assert seen["reapplied"] == 0
    assert seen["after_remove"] != 0
    assert [n for n in seen["files_left"] if n.startswith("jitmesh")] == []
    # Extension: one file, the later deadline.
    assert "grant=grt-ccc" in seen["extended_file"]
    assert seen["extended_allowed"] == 0
    # sudo refuses after NOTAFTER on its own (1 s resolution), with the drop-in still there.
    assert seen["native_allowed_before"] == 0
    assert seen["native_file_still_there"]
    assert_refused_on_time(seen["native_refused"])


def test_the_grant_ends_on_time_with_the_agent_running_and_with_it_killed(
    tmp_path: Path,
) -> None:
    """Through a real coordinator and jitmesh-agent: sudo (restart) and an SSH key (logs)."""
    seen = sandbox.run(tmp_path, "sudo_agent", 8)
    for case in ("running", "killed"):
        assert seen[f"{case}_sudo_allowed"] == 0
        assert seen[f"{case}_ssh_allowed"] == 0
        assert "NOTAFTER=" in seen[f"{case}_file"]
        assert_refused_on_time(seen[f"{case}_sudo_refused"])
        assert_refused_on_time(seen[f"{case}_ssh_refused"])
    # The running agent removed the drop-in and the keys on time ...
    assert -1.0 <= seen["running_removed_after_s"] <= 3.0
    # ... with the agent dead nobody removed them: sudo and sshd refused on their own; the
    # agent, started again, removed what had expired.
    assert seen["killed_files_still_there"] == [True, True]
    assert seen["restarted_cleaned_up"]


def test_overlapping_grants_share_one_drop_in_with_the_latest_deadline(tmp_path: Path) -> None:
    seen = sandbox.run(tmp_path, "sudo_overlap")
    assert seen["one"] < seen["two"]
    assert seen["two_allowed"] == 0
    # The longest revoked: the deadline comes back to the other grant's; still allowed.
    assert seen["back_to_one"] == seen["one"]
    assert seen["one_allowed"] == 0
    # The last one revoked: the drop-in goes.
    assert seen["none_left"] is False
    assert seen["none_allowed"] != 0
