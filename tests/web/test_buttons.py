"""The web page's buttons in a real browser (issue 13): "Request access" offers only what the
coordinator says this person may ask for (hosts, actions and durations up to the rule's
longest), and a person's live grant is extended and released from the overview."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from playwright.async_api import Browser, expect

from jitmesh.clock import SystemClock
from jitmesh.types import GrantState, RequestState
from tests.notify.test_outbox import running
from tests.web.browsing import csrf_of, shot, sign_in, start_web, stopping


async def test_request_options_extend_and_release_in_the_browser(
    tmp_path: Path, browser: Browser
) -> None:
    async with running(tmp_path / "c", SystemClock()) as (coordinator, clients):
        web, base = await start_web(coordinator.port, tmp_path / "web.log", "--dev-token-sign-in")
        with stopping(web):
            alice_ctx, alice = await sign_in(browser, base, "alice")
            await alice.goto(base + "/requests/new")
            # alice (developers) may ask for deploy, restart and logs, for up to 1h: on the
            # staging host at once, on the prod host with sre's approval. Nothing else is offered.
            offered = await alice.locator("#option option").all_inner_texts()
            assert len(offered) == 6
            assert "deploy on web-1 · up to 1h · approved at once" in offered
            assert "deploy on db-1 · up to 1h · needs approval: sre" in offered
            assert not any("shell" in o or "db-migrate" in o for o in offered)
            assert await alice.locator("#duration option").all_inner_texts() == [
                "15m", "30m", "1h",
            ]  # fmt: skip
            await expect(alice.locator("#options")).to_contain_text("needs approval: sre")
            await shot(alice, "request-options")

            # Longer than the rule allows, posted by hand: refused with the bound, nothing filed.
            csrf = await csrf_of(alice)
            posted = await alice.request.post(
                base + "/requests",
                form={"csrf": csrf, "option": "web-1 deploy", "duration": "2h", "reason": "x"},
            )
            assert posted.status == 400
            assert "at most 1h" in await posted.text()
            # Something not offered: refused the same way.
            posted = await alice.request.post(
                base + "/requests",
                form={"csrf": csrf, "option": "db-1 shell", "duration": "15m", "reason": "x"},
            )
            assert posted.status == 400
            assert await clients["alice"].list_requests() == []

            # The offered choice, approved at once.
            await alice.select_option("#option", "web-1 deploy")
            await alice.select_option("#duration", "30m")
            await alice.click("text=File request")
            await expect(alice.locator("#request-state")).to_have_text("APPROVED")
            [request] = await clients["alice"].list_requests()
            assert request.state is RequestState.APPROVED
            grant = await clients["alice"].get_grant(request.grant_id)
            assert grant.not_after - grant.not_before == timedelta(minutes=30)

            # Extend from the overview by the chosen amount: the same grant ends later.
            await alice.goto(base + "/")
            row = alice.locator("#grants tr", has_text="deploy on web-1")
            await row.locator("select[name=by]").select_option("15m")
            await row.get_by_role("button", name="Extend").click()
            await expect(alice.locator(".flash.ok")).to_contain_text("Extended by 15m")
            extended = await clients["alice"].get_grant(grant.id)
            assert extended.not_after == grant.not_after + timedelta(minutes=15)
            await shot(alice, "overview-extended")
            # An amount not offered, posted by hand: refused, the end unchanged.
            await alice.request.post(
                f"{base}/grants/{grant.id}/extend", form={"csrf": csrf, "by": "7d"}
            )
            assert (await clients["alice"].get_grant(grant.id)).not_after == extended.not_after

            # Release: the grant ends, and leaves the overview.
            await alice.goto(base + "/")
            await (
                alice.locator("#grants tr", has_text="deploy on web-1")
                .locator("text=Release")
                .click()
            )
            await expect(alice.locator(".flash.ok")).to_contain_text("Released")
            released = await clients["alice"].get_grant(grant.id)
            assert released.state not in (GrantState.PENDING_DELIVERY, GrantState.ACTIVE)
            # (No agent runs here: the grant waits in REVOKING for the host, without buttons.)
            await expect(row).not_to_contain_text("ACTIVE")
            await expect(row.get_by_role("button")).to_have_count(0)
            await alice_ctx.close()

            # bob (sre) is offered every action on the prod host, for up to 4h.
            bob_ctx, bob = await sign_in(browser, base, "bob")
            await bob.goto(base + "/requests/new")
            offered = await bob.locator("#option option").all_inner_texts()
            assert "shell on db-1 · up to 4h · needs approval: sre" in offered
            assert not any("web-1" in o for o in offered)
            assert (await bob.locator("#duration option").all_inner_texts())[-1] == "4h"
            await bob_ctx.close()
