"""The ssh enforcer with Debian's openssh-server: a real key login over loopback."""

from __future__ import annotations

from pathlib import Path

from tests.host import sandbox
from tests.host.sandbox import assert_refused_on_time


def test_a_key_logs_in_while_the_grant_holds_and_sshd_refuses_it_after(tmp_path: Path) -> None:
    seen = sandbox.run(tmp_path, "ssh_enforcer")
    assert seen["sshd_T"] == ["authorizedkeysfile .ssh/authorized_keys /etc/ssh/jitmesh_keys/%u"]
    assert seen["before"] != 0
    assert (seen["mode"], seen["owner"]) == ("0o644", 0)
    assert 'expiry-time="' in seen["file"]
    assert 'Z" ssh-ed25519 ' in seen["file"]
    assert seen["login"] == [0, "alice"]
    assert seen["observed"] == [["alice", "ssh"]]
    # sshd itself refuses after expiry-time (whole seconds: at most 1 s early, never late),
    # with the file still in place.
    assert_refused_on_time(seen["refused"])
    assert seen["file_still_there"]
    assert "no public key registered for bob" in seen["bob"]
