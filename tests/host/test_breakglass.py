"""Break-glass on a real host: `jitmesh-agent breakglass` run by real users (su) against a real
jitmesh-agent process, the caller identified by the kernel (SO_PEERCRED), in a private mount
namespace. The decision alone is tested in tests/agent/test_breakglass.py."""

from __future__ import annotations

from pathlib import Path

from tests.host import sandbox


def test_only_the_codes_subject_or_root_may_use_it(tmp_path: Path) -> None:
    seen = sandbox.run(tmp_path, "breakglass_caller")
    first, second = seen["codes"]
    # bob presents alice's code as himself: refused, saying why, never echoing the code; no
    # access for anyone.
    rc, out, echoed = seen["bob"]
    assert rc == 1, out
    assert "this code is for alice: run it as that user or as root" in out
    assert not echoed
    assert seen["bob_marker"] is False
    assert seen["alice_check_before"] == 1
    # The refusal did not use the code up: alice, as herself, gets her access with it.
    rc, out, echoed = seen["alice"]
    assert rc == 0, out
    assert f"grant_id=bg-{first}" in out
    assert "subject=alice" in out
    assert "action=restart" in out
    assert not echoed
    assert seen["alice_marker"] is True
    assert seen["alice_check"] == 0
    assert seen["bob_check"] == 1
    # Each code works once.
    rc, out, echoed = seen["alice_again"]
    assert rc == 1, out
    assert "used already" in out
    assert not echoed
    # Root may present a code for alice.
    rc, out, echoed = seen["root"]
    assert rc == 0, out
    assert f"grant_id=bg-{second}" in out
    assert not echoed
    # The coordinator adopted both uses and recorded who presented each; the codes' text is in
    # neither the audit log nor the agent's log.
    assert seen["adopted"] == sorted([[first, "alice", "alice"], [second, "root", "alice"]])
    assert seen["codes_in_audit"] is False
    assert seen["codes_in_agent_log"] is False
