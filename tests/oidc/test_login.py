"""`jitctl login` against the real provider: the CLI (a real process) prints the sign-in address,
a person signs in there (the provider's pages, driven over HTTP), the browser comes back to the
CLI's loopback listener, and the CLI keeps a short-lived jitmesh token that later commands use."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx

from server.app import Coordinator
from tests.e2e.procs import BIN, jitctl
from tests.oidc.provider import Provider, sign_in_at


async def test_jitctl_login_signs_in_through_the_browser_and_keeps_the_token(
    coordinator: Coordinator, provider: Provider, tmp_path: Path
) -> None:
    token_file = tmp_path / "config" / "token"
    env = {
        "JITMESH_COORDINATOR": f"127.0.0.1:{coordinator.port}",
        "JITMESH_TOKEN_FILE": str(token_file),
    }
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "jitctl"), "login", "--no-browser", "--wait", "60", "-o", "json",
        env={**os.environ, **env}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    async with asyncio.timeout(30):
        assert (await proc.stderr.readline()).startswith(b"Open this address to sign in")
        url = (await proc.stderr.readline()).decode().strip()
    async with httpx.AsyncClient(timeout=10.0) as browser:
        redirect = parse_qs(urlparse(url).query)["redirect_uri"][0]
        assert redirect.startswith("http://127.0.0.1:")  # RFC 8252 loopback redirect
        back = await sign_in_at(browser, url, "carol", redirect)
        page = await browser.get(back)  # the browser lands on jitctl's loopback listener
        assert "Signed in to jitmesh." in page.text
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["user"] == "carol"
    assert result["token_file"] == str(token_file)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    # Later commands use the kept token.
    code, out_text, err_text = await jitctl("whoami", "-o", "json", env=env)
    assert code == 0, err_text
    assert json.loads(out_text) == {"user": "carol", "groups": ["sre"], "managed_by": "oidc"}


async def test_jitctl_login_says_when_single_sign_on_is_not_configured(tmp_path: Path) -> None:
    from server.app import build
    from server.config import CoordinatorConfig

    plain = await build(CoordinatorConfig(data_dir=tmp_path / "plain", port=0))
    try:
        code, _, err = await jitctl(
            "login", "--no-browser",
            env={"JITMESH_COORDINATOR": f"127.0.0.1:{plain.port}",
                 "JITMESH_TOKEN_FILE": str(tmp_path / "token")},
        )  # fmt: skip
    finally:
        await plain.stop()
    assert code != 0
    assert "single sign-on is not configured" in err
    assert not (tmp_path / "token").exists()
