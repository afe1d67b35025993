"""jitmesh-web across a restart of its coordinator: the signed-in person keeps their session
(their token is the coordinator's, kept in its store), is told plainly while the coordinator
cannot be reached, and carries on once it is back, without signing in again."""

from __future__ import annotations

from pathlib import Path

from playwright.async_api import Browser, expect

from jitmesh.clock import SystemClock
from tests.e2e.procs import free_port
from tests.notify.test_outbox import running
from tests.web.browsing import csrf_of, sign_in, start_web, stopping


async def test_the_page_survives_a_coordinator_restart(tmp_path: Path, browser: Browser) -> None:
    port = free_port()
    data = tmp_path / "c"
    web, base = await start_web(port, tmp_path / "web.log", "--dev-token-sign-in")
    with stopping(web):
        async with running(data, SystemClock(), port=port):
            context, alice = await sign_in(browser, base, "alice")
            await alice.goto(base + "/requests/new")
            await alice.select_option("#option", "db-1 deploy")
            await alice.fill("#reason", "before the restart")
            await alice.click("text=File request")
            await expect(alice.locator("#request-state")).to_have_text("PENDING")
            request_url = alice.url
        # The coordinator is down: the page says so (not a bare server error), the session stays.
        response = await alice.goto(base + "/")
        assert response is not None
        assert response.status == 503
        await expect(alice.locator("main")).to_contain_text("cannot reach the coordinator")
        assert await response.header_value("retry-after") == "5"
        # An action while it is down: a 503 that says it may not have been done.
        posted = await alice.request.post(
            request_url + "/cancel", form={"csrf": await csrf_of(alice)}, max_redirects=0
        )
        assert posted.status == 503
        assert "whether your action was done" in await posted.text()
        # Back: the same session carries on at once (a 503 before this change: the session's
        # channel waited out gRPC's reconnect backoff after the failed calls).
        async with running(data, SystemClock(), port=port):
            response = await alice.goto(request_url)
            assert response is not None
            assert response.status == 200
            await expect(alice.locator("#request-state")).to_have_text("PENDING")
            await expect(alice.locator("#subject")).to_have_text("alice")
        # Restarted again while nobody looked: the next page works at once.
        async with running(data, SystemClock(), port=port):
            response = await alice.goto(base + "/")
            assert response is not None
            assert response.status == 200
            await expect(alice.locator("#mine")).to_contain_text("deploy on db-1")
        await context.close()
