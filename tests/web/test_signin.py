"""Single sign-on in the browser (issue 13): jitmesh-web runs the authorization code flow with
PKCE against a real OpenID Connect provider (npm's oidc-provider), in Debian's chromium.

The page and the provider are on different sites (`localhost` and `127.0.0.1`), as in production,
so the provider's redirect back is a cross-site navigation: the sign-in binding cookie must be
SameSite=Lax to come with it, and the Strict session cookie is only used from the page's own
next navigation. Login CSRF: a callback address made in one browser (the attacker's, for the
attacker's account) signs nobody in in another; a forged or tampered binding, a replayed
callback and a mismatched state are refused."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from jitmesh.clock import SystemClock
from server.app import Coordinator, build
from server.config import CoordinatorConfig
from server.domain.policy import DEV_POLICY
from tests.e2e.procs import free_port
from tests.oidc.conftest import ACCOUNTS
from tests.oidc.provider import CLIENT_ID, Provider, client, sign_in_at
from tests.web.browsing import start_web, stopping

REFUSED = "did not start in this browser"


@pytest.fixture
def base() -> str:
    # The page's own site (localhost) differs from the provider's (127.0.0.1).
    return f"http://localhost:{free_port()}"


@pytest.fixture
def provider(tmp_path: Path, base: str) -> Iterator[Provider]:
    started = Provider(
        tmp_path / "idp",
        {k: dict(v) for k, v in ACCOUNTS.items()},
        clients=[client(f"{base}/signin/callback")],
    ).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
async def coordinator(tmp_path: Path, provider: Provider) -> AsyncIterator[Coordinator]:
    config = CoordinatorConfig(
        data_dir=tmp_path / "coordinator", port=0, default_policy=DEV_POLICY,
        oidc_issuer=provider.issuer, oidc_client_id=CLIENT_ID,
    )  # fmt: skip
    built = await build(config, clock=SystemClock())
    try:
        yield built
    finally:
        await built.stop()


async def start_sign_in(context: BrowserContext, base: str, issuer: str) -> tuple[Page, str]:
    """Open the page, press "Sign in with single sign-on", and arrive at the provider; the
    page and the authorization address it was sent to."""
    page = await context.new_page()
    await page.goto(base + "/requests/new")
    await expect(page).to_have_url(re.compile(r"/signin\?next="))
    async with page.expect_request(lambda r: r.url.startswith(f"{issuer}/auth?")) as asked:
        await page.click("text=Sign in with single sign-on")
    await expect(page).to_have_url(re.compile("^" + re.escape(issuer)))
    return page, (await asked.value).url


async def at_provider(page: Page, login: str) -> None:
    """The person signs in at the provider (its development login form) and consents."""
    await page.fill("input[name=login]", login)
    await page.fill("input[name=password]", "any")
    await page.click("button[type=submit]")
    await page.locator("button[type=submit]").click()  # consent


async def cookies(context: BrowserContext, base: str) -> dict[str, dict[str, object]]:
    """The page's cookies, whatever their path (the binding cookie's is the callback's)."""
    host = base.split("://", 1)[1].split(":", 1)[0]
    return {str(c["name"]): dict(c) for c in await context.cookies() if c["domain"] == host}


async def test_sign_in_with_single_sign_on_in_the_browser(
    tmp_path: Path, base: str, provider: Provider, coordinator: Coordinator, browser: Browser
) -> None:
    port = int(base.rsplit(":", 1)[1])
    web, _ = await start_web(
        coordinator.port, tmp_path / "web.log", "--public-url", base, listen=f"127.0.0.1:{port}"
    )
    with stopping(web):
        context = await browser.new_context()
        page, _ = await start_sign_in(context, base, provider.issuer)
        binding = (await cookies(context, base))["jm_oidc"]
        assert binding["httpOnly"] is True
        assert binding["sameSite"] == "Lax"
        assert binding["secure"] is True
        assert binding["path"] == "/signin/callback"
        # The provider folds nothing: "Bob" signs in; the coordinator's name is "bob".
        await at_provider(page, "Bob")
        await expect(page.locator("h1")).to_have_text("Request access", timeout=15_000)
        await expect(page.locator("#me")).to_have_text("bob")
        jar = await cookies(context, base)
        assert "jm_oidc" not in jar  # used once, then gone
        session = jar["jm_session"]
        assert session["httpOnly"] is True
        assert session["sameSite"] == "Strict"
        user = await coordinator.store.get_user("bob")
        assert user is not None
        assert user.managed_by == "oidc"
        await context.close()
    log = (tmp_path / "web.log").read_text()
    assert str(session["value"]) not in log
    assert str(binding["value"]) not in log


async def test_login_csrf_a_callback_from_another_browser_signs_nobody_in(
    tmp_path: Path, base: str, provider: Provider, coordinator: Coordinator, browser: Browser
) -> None:
    port = int(base.rsplit(":", 1)[1])
    web, _ = await start_web(
        coordinator.port, tmp_path / "web.log", "--public-url", base, listen=f"127.0.0.1:{port}"
    )
    with stopping(web):
        # The attacker starts a sign-in in their browser (which gets its binding cookie), signs
        # in at the provider with their own account (alice; here with an HTTP client, the
        # attacker's tool), and keeps the callback address instead of following it.
        attacker = await browser.new_context()
        page, authorization = await start_sign_in(attacker, base, provider.issuer)
        async with httpx.AsyncClient(timeout=10.0) as tool:
            callback = await sign_in_at(tool, authorization, "alice", f"{base}/signin/callback")
        assert "code=" in callback
        assert "state=" in callback

        # The victim opens it (a link, an image, a redirect the attacker controls): refused,
        # not signed in, as alice or anyone.
        victim = await browser.new_context()
        seen = await victim.new_page()
        await seen.goto(callback)
        await expect(seen.locator("main")).to_contain_text(REFUSED)
        assert "jm_session" not in await cookies(victim, base)
        await seen.goto(base + "/")
        await expect(seen).to_have_url(re.compile(r"/signin"))

        # A victim with a sign-in of their own in flight: the states differ, refused too, and
        # the victim's own sign-in is not cancelled by it: it still finishes, as the victim.
        own, own_authorization = await start_sign_in(victim, base, provider.issuer)
        await own.goto(callback)
        await expect(own.locator("main")).to_contain_text(REFUSED)
        assert "jm_session" not in await cookies(victim, base)
        async with httpx.AsyncClient(timeout=10.0) as victims_idp_session:
            own_callback = await sign_in_at(
                victims_idp_session, own_authorization, "carol", f"{base}/signin/callback"
            )
        await own.goto(own_callback)
        await expect(own.locator("#me")).to_have_text("carol", timeout=15_000)

        # A binding cookie forged for the attacker's state (without this process's key).
        state = re.search(r"[?&]state=([^&]+)", callback)
        assert state is not None
        forged = await browser.new_context()
        await forged.add_cookies([{
            "name": "jm_oidc", "value": "eyJzIjoiZm9yZ2VkIn0.bm90LWEtbWFj",
            "url": base + "/signin/callback",
        }])  # fmt: skip
        tampered = await forged.new_page()
        await tampered.goto(callback)
        await expect(tampered.locator("main")).to_contain_text(REFUSED)
        assert "jm_session" not in await cookies(forged, base)

        # The same address in the browser that started it finishes the sign-in (nothing
        # above consumed it), once: a replay is refused.
        await page.goto(callback)
        await expect(page.locator("#me")).to_have_text("alice", timeout=15_000)
        again = await attacker.new_page()
        await again.goto(callback)
        await expect(again.locator("main")).to_contain_text(REFUSED)
        for context in (attacker, victim, forged):
            await context.close()


@pytest.mark.parametrize(
    "trick", ["/\\{host}/", "/\t/{host}/", "/\n/{host}/"], ids=["backslash", "tab", "newline"]
)
async def test_after_sign_in_the_page_never_sends_the_browser_to_another_site(
    tmp_path: Path,
    base: str,
    provider: Provider,
    coordinator: Coordinator,
    browser: Browser,
    trick: str,
) -> None:
    # Open redirect: a link to the sign-in page whose `next` a browser reads as another site
    # ("/\\evil.example" is "//evil.example" to a browser, and tabs and newlines are dropped from
    # addresses). After signing in the browser must stay on the page; here "another site" is
    # the provider's, a real server, so a redirect there would load.
    other = provider.issuer.split("://", 1)[1].split("/", 1)[0]
    port = int(base.rsplit(":", 1)[1])
    web, _ = await start_web(
        coordinator.port, tmp_path / "web.log", "--public-url", base, listen=f"127.0.0.1:{port}"
    )
    with stopping(web):
        context = await browser.new_context()
        page = await context.new_page()
        await page.goto(f"{base}/signin?{urlencode({'next': trick.format(host=other)})}")
        async with page.expect_request(lambda r: r.url.startswith(f"{provider.issuer}/auth?")):
            await page.click("text=Sign in with single sign-on")
        await at_provider(page, "carol")
        await expect(page.locator("#me")).to_have_text("carol", timeout=15_000)
        assert page.url.startswith(base + "/"), page.url
        await context.close()
