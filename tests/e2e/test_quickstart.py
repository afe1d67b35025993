"""scripts/quickstart as a new user sees it through a pipe (issue 10 item 17): it ends well, every
command it shows can be pasted into a shell that sourced dev.env (no private helper names such
as `as alice`), and piped output carries no colour codes."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SHOWN = re.compile(r"^(JITMESH_TOKEN=\$JITMESH_TOKEN_[A-Z]+ )?(jitctl|jitmesh-agent) ")


@pytest.mark.subprocess
@pytest.mark.timeout(600)
def test_quickstart_prints_commands_you_can_paste(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITMESH_")}
    env["JITMESH_QUICKSTART_DIR"] = str(tmp_path / "qs")
    done = subprocess.run(
        [str(ROOT / "scripts" / "quickstart")],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "\x1b" not in done.stdout + done.stderr
    shown = [line[2:] for line in done.stdout.splitlines() if line.startswith("$ ")]
    assert len(shown) >= 10
    for command in shown:
        assert SHOWN.match(command), command
    assert f"set -a; source {tmp_path / 'qs'}/coordinator/dev.env; set +a" in done.stdout
