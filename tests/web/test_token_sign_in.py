"""Signing in to jitmesh-web with a development token (`--dev-token-sign-in`), over plain HTTP:
a token the coordinator refuses for whoami is answered on the sign-in page, never with a server
error, and signs nobody in."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from pathlib import Path

import httpx

from jitmesh.clock import SystemClock
from tests.e2e.procs import BIN
from tests.notify.test_outbox import running
from tests.web.browsing import start_web, stopping


async def test_a_bridge_token_does_not_sign_in_to_the_web_page(tmp_path: Path) -> None:
    async with running(tmp_path / "c", SystemClock()) as (coordinator, clients):
        bridge, _ = await clients["admin"].create_token(
            "slack-bridge", groups=["bridges"], ttl=timedelta(hours=1),
            scopes=["review-on-behalf"],
        )  # fmt: skip
        web, base = await start_web(
            coordinator.port, tmp_path / "web.log", "--dev-token-sign-in", "--insecure-cookies"
        )
        with stopping(web):
            async with httpx.AsyncClient(base_url=base, timeout=10.0) as browser:
                page = await browser.get("/signin")
                found = re.search(r'name="csrf" value="([^"]+)"', page.text)
                assert found is not None
                answer = await browser.post(
                    "/signin/token",
                    data={"csrf": found.group(1), "token": bridge, "next": "/"},
                    headers={"origin": base},
                )
                # A scoped token may make no call but a delegated review: not a person's.
                assert answer.status_code == 303, answer.text
                assert answer.headers["location"] == "/signin?error=token"
                assert "jm_session" not in browser.cookies
        assert bridge not in (tmp_path / "web.log").read_text()


async def test_an_unreadable_ca_file_is_a_clear_error(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "jitmesh-web"), "--ca-file", str(tmp_path / "missing.pem"),
        "--listen", "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 1
    assert out == b""
    assert err.decode().strip() == (
        f"jitmesh-web: cannot read --ca-file {tmp_path / 'missing.pem'}: No such file or "
        "directory (give the coordinator's CA certificate: ca/ca.pem in its data directory)"
    )
