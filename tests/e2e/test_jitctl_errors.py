"""jitctl seen from outside (issue 10 item 10): the installed console script, as a process, against
a real coordinator. Each kind of failure has its documented exit code (docs/cli.md, "Errors and
exit codes"); with -o json the error is a JSON object on stderr; `policy test` exits non-zero on
deny and tests a document with -f; `policy apply --dry-run` prints the diff and changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

from jitmesh.cli.main import EXIT_CODES
from tests.e2e.conftest import Mesh
from tests.e2e.procs import free_port, jitctl

NO_REQUEST = "req-" + "0" * 32


def _as(mesh: Mesh, user: str) -> dict[str, str]:
    return {"JITMESH_COORDINATOR": mesh.address, "JITMESH_TOKEN": f"jmt_test-{user}"}


async def test_each_kind_of_failure_has_its_exit_code(mesh: Mesh, tmp_path: Path) -> None:
    await mesh.start_agent("web-1", "staging")
    await mesh.start_agent("db-1", "prod")
    alice = _as(mesh, "alice")
    policy = tmp_path / "policy.yaml"
    policy.write_text("actions: [deploy]\nrules: []\n")

    cases = {
        "usage": (("grant", "show", NO_REQUEST), alice),
        "not_found": (("request", "show", NO_REQUEST), alice),
        "permission": (("policy", "apply", "-f", str(policy)), alice),
        "policy_denied": (
            ("request", "create", "--agent", "web-1", "--action", "shell", "--duration", "5m"),
            alice,
        ),
        "unavailable": (
            ("agent", "list"),
            {**alice, "JITMESH_COORDINATOR": f"127.0.0.1:{free_port()}"},
        ),
        "timed_out": (
            (
                *("request", "create", "--agent", "db-1", "--action", "deploy"),
                *("--duration", "5m", "--reason", "INC-1", "--wait", "--wait-timeout", "300ms"),
            ),
            alice,
        ),
    }
    codes = {exit.kind: exit.code for exit in EXIT_CODES.values()}
    assert codes == {
        "failed": 1,
        "usage": 2,
        "not_found": 3,
        "permission": 4,
        "policy_denied": 5,
        "unavailable": 6,
        "timed_out": 7,
    }
    for kind, (argv, env) in cases.items():
        code, _, err = await jitctl(*argv, env=env)
        assert code == codes[kind], (kind, err)
        assert err.startswith("jitctl: "), (kind, err)
        assert err.count("\n") == 1, (kind, err)
        # The same failure with -o json: one JSON object on stderr, for programs.
        code, _, err = await jitctl(*argv, "-o", "json", env=env)
        assert code == codes[kind], (kind, err)
        error = json.loads(err)["error"]
        assert (error["kind"], error["exit_code"]) == (kind, codes[kind])
        assert error["message"]

    code, _, err = await jitctl("request", "show", NO_REQUEST, "-o", "json", env=alice)
    assert json.loads(err) == {
        "error": {
            "kind": "not_found",
            "exit_code": 3,
            "message": f"no such request {NO_REQUEST} (or not one you may see)",
            "code": "NOT_FOUND",
            "reason": "NOT_FOUND",
        }
    }
    code, _, err = await jitctl(*cases["policy_denied"][0], "-o", "json", env=alice)
    error = json.loads(err)["error"]
    assert (error["code"], error["reason"]) == ("PERMISSION_DENIED", "POLICY_DENIED")
    # A usage error found by the parser, before -o was read, is JSON too.
    code, _, err = await jitctl("-o", "json", "grant", "list", "--colour", env=alice)
    assert code == 2
    assert json.loads(err)["error"]["kind"] == "usage"


TIGHTER = """\
version: 1
actions: [deploy, restart, logs, shell, db-migrate]
rules:
  - name: staging-deploy-only
    subjects: {groups: [developers]}
    actions: [deploy]
    agents: {labels: {env: staging}}
"""


async def test_policy_test_exits_5_on_deny_and_tests_a_file(mesh: Mesh, tmp_path: Path) -> None:
    await mesh.start_agent("web-1", "staging")
    admin = _as(mesh, "admin")
    ask = ("policy", "test", "--subject", "alice", "--agent", "web-1")
    code, out, err = await jitctl(*ask, "--action", "restart", env=admin)
    assert (code, err) == (0, "")
    assert "allowed by rule staging-self-service" in out
    code, out, err = await jitctl(*ask, "--action", "shell", env=admin)
    assert code == 5
    assert "denied" in out
    assert err.startswith("jitctl: denied: ")

    proposed = tmp_path / "policy.yaml"
    proposed.write_text(TIGHTER)
    code, out, _ = await jitctl(*ask, "--action", "restart", "-f", str(proposed), env=admin)
    assert code == 5
    code, out, err = await jitctl(
        *ask, "--action", "deploy", "-f", str(proposed), "-o", "json", env=admin
    )
    assert code == 0, err
    assert json.loads(out)["rule"] == "staging-deploy-only"


async def test_apply_dry_run_prints_the_diff_and_changes_nothing(
    mesh: Mesh, tmp_path: Path
) -> None:
    admin = _as(mesh, "admin")
    before = await mesh.client("admin").get_policy()
    proposed = tmp_path / "policy.yaml"
    proposed.write_text(TIGHTER)
    code, out, err = await jitctl("policy", "apply", "-f", str(proposed), "--dry-run", env=admin)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:2] == [f"--- running (v{before.version})", "+++ proposed"]
    assert "+  - name: staging-deploy-only" in lines
    assert "-  - name: sre-prod" in lines
    code, out, err = await jitctl(
        "policy", "apply", "-f", str(proposed), "--dry-run", "-o", "json", env=admin
    )
    body = json.loads(out)
    assert (body["dry_run"], body["changed"], body["version"]) == (True, True, before.version + 1)
    assert await mesh.client("admin").get_policy() == before

    same = tmp_path / "same.yaml"
    same.write_text(before.yaml)
    code, out, err = await jitctl("policy", "apply", "-f", str(same), "--dry-run", env=admin)
    assert code == 0, err
    assert out == f"no changes: the document is the running policy (v{before.version})\n"

    broken = tmp_path / "broken.yaml"
    broken.write_text("actions: [deploy]\nrulez: []\n")
    code, _, err = await jitctl("policy", "apply", "-f", str(broken), "--dry-run", env=admin)
    assert code == 2
    assert "unknown key 'rulez' (did you mean 'rules'?)" in err
