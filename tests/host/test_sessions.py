"""end_sessions = "user": the subject's own processes end with their last grant on the host."""

from __future__ import annotations

from pathlib import Path

from tests.host import sandbox


def test_every_process_of_the_user_ends_with_the_last_grant(tmp_path: Path) -> None:
    seen = sandbox.run(tmp_path, "end_user_sessions")
    assert seen["after_first"] is True  # another grant still held: left alone
    assert seen["alice_ended"]
    assert seen["bob_running"]
    assert [(e["scope"], e["user"], e["cause"]) for e in seen["events"]] == [
        ("user", "alice", "revoked")
    ]
    assert int(seen["events"][0]["processes"]) >= 1
