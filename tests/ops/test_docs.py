"""The docs stay true: the policy reference's example is a valid policy, the CLI reference
matches the commands (scripts/check runs the same), and every page the README names exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from server.domain.policy import parse_policy

ROOT = Path(__file__).parents[2]


def test_policy_reference_example_is_valid() -> None:
    text = (ROOT / "docs" / "policy.md").read_text()
    example = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert example is not None
    policy = parse_policy(example.group(1))
    assert [rule.name for rule in policy.model.rules] == [
        "staging-self-service",
        "prod-with-approval",
        "no-shell-on-db",
    ]


def test_cli_reference_is_in_sync() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_cli_docs"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_pages_named_in_the_readme_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in re.findall(r"`((?:docs|examples|packaging)/[\w./-]+)`", readme):
        assert (ROOT / name).exists(), name
