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
import pytest

from jitmesh.client import Client
from server.app import Coordinator
from tests.e2e.procs import BIN, jitctl
from tests.oidc.provider import Provider, sign_in_at


async def test_jitctl_login_signs_in_through_the_browser_and_keeps_the_token(
    coordinator: Coordinator, provider: Provider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
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
    # So does the SDK, connecting the way jitctl does.
    monkeypatch.setenv("JITMESH_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.delenv("JITMESH_TOKEN", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    async with await Client.from_config() as client:
        me = await client.whoami()
    assert (me.name, me.groups) == ("carol", ("sre",))


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


async def test_jitctl_login_keeps_the_token_in_the_active_profiles_token_file(
    coordinator: Coordinator, provider: Provider, tmp_path: Path
) -> None:
    # A profile naming its own token file, which holds an old (revoked-looking) token and is
    # readable by others: login replaces it with the new token, 0600; the CLI's default token
    # file is not written.
    profile_token = tmp_path / "corp" / "corp.token"
    profile_token.parent.mkdir()
    profile_token.write_text("jmt_old_token_0123456789\n")
    profile_token.chmod(0o644)
    config = tmp_path / "config.toml"
    config.write_text(
        'default_profile = "other"\n'
        "[profiles.other]\n"
        'coordinator = "127.0.0.1:1"\n'
        "[profiles.corp]\n"
        f'coordinator = "127.0.0.1:{coordinator.port}"\n'
        f'token_file = "{profile_token}"\n'
    )
    default_token = tmp_path / "default.token"
    env = {"JITMESH_CONFIG": str(config), "JITMESH_TOKEN_FILE": str(default_token)}
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "jitctl"), "--profile", "corp", "login", "--no-browser", "--wait", "60",
        "-o", "json",
        env={**os.environ, **env}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    async with asyncio.timeout(30):
        assert (await proc.stderr.readline()).startswith(b"Open this address to sign in")
        url = (await proc.stderr.readline()).decode().strip()
    async with httpx.AsyncClient(timeout=10.0) as browser:
        redirect = parse_qs(urlparse(url).query)["redirect_uri"][0]
        back = await sign_in_at(browser, url, "carol", redirect)
        await browser.get(back)
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert (result["profile"], result["token_file"]) == ("corp", str(profile_token))
    assert stat.S_IMODE(profile_token.stat().st_mode) == 0o600
    saved = profile_token.read_text().strip()
    assert saved.startswith("jmt_")
    assert "old" not in saved
    assert not default_token.exists()
    assert [p.name for p in profile_token.parent.iterdir()] == ["corp.token"]  # no temp left
    # Later commands with the profile use it (and the token is never printed).
    code, out_text, err_text = await jitctl("--profile", "corp", "whoami", "-o", "json", env=env)
    assert code == 0, err_text
    assert json.loads(out_text)["user"] == "carol"
    assert saved not in out.decode() + err.decode() + out_text + err_text
    # The default profile is another coordinator: without --profile, the token is not sent
    # there (nothing listens at 127.0.0.1:1, and the default token file is empty).
    code, _, _ = await jitctl("whoami", env=env)
    assert code != 0
