"""Shared parts of the browser tests: Debian's chromium driven by Playwright (never a browser
Playwright downloads), and jitmesh-web started as a real process."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from tests.e2e.procs import BIN
from tests.server.helpers import TOKENS

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SHOTS = os.environ.get("JITMESH_SCREENSHOTS", "")
# Each expectation waits for its condition up to this long (Playwright's default is 5 s; the
# test machine's two cores are shared, and a page behind a gRPC call can take longer).
expect.set_options(timeout=15_000)


async def shot(page: Page, name: str) -> None:
    if SHOTS:
        await page.screenshot(path=str(Path(SHOTS) / f"web-{name}.png"), full_page=True)


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


async def start_web(
    coordinator_port: int, log: Path, *extra: str, listen: str = "127.0.0.1:0"
) -> tuple[subprocess.Popen[str], str]:
    """A jitmesh-web process for the coordinator on `coordinator_port`; its address once it
    says it listens. `extra`: more flags (`--dev-token-sign-in`, `--public-url ...`)."""
    with log.open("w") as errors:
        proc = subprocess.Popen(
            [str(BIN / "jitmesh-web"), "--coordinator", f"127.0.0.1:{coordinator_port}",
             "--listen", listen, "--log-level", "warning", *extra],
            stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
    match = re.match(r"jitmesh-web listening on (http://\S+)", line)
    if match is None:
        proc.terminate()
        raise AssertionError(f"jitmesh-web did not start: {line!r} {log.read_text()}")
    return proc, match.group(1)


@contextmanager
def stopping(proc: subprocess.Popen[str]) -> Iterator[None]:
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


async def sign_in(browser: Browser, base: str, user: str) -> tuple[BrowserContext, Page]:
    """A new browser context signed in with `user`'s development token."""
    context = await browser.new_context(viewport={"width": 1100, "height": 800})
    page = await context.new_page()
    await page.goto(base + "/")
    await expect(page).to_have_url(re.compile(r"/signin"))
    await page.fill("#token", TOKENS[user])
    await page.click("text=Sign in with token")
    await expect(page.locator("h1")).to_have_text(f"Hello, {user}")
    return context, page


async def csrf_of(page: Page) -> str:
    value = await page.locator("form.signout input[name=csrf]").get_attribute("value")
    assert value
    return value
