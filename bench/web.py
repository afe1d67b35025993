"""Scenario 16: the web page's review list under load.

A real `jitmesh-coordinator dev` process with 100 requests waiting for approval (alice's, on an
env=prod agent: the dev policy wants an sre's approval), a real `jitmesh-web` process (uvicorn,
Starlette, the SDK over gRPC to the coordinator with the signed-in person's token), and bob
signed in through the development token sign-in form. C concurrent HTTP clients (httpx, one
connection each) fetch bob's home page, which lists the requests he may review, for T seconds;
the baseline is the same server's `/healthz` (uvicorn, Starlette and the security-header
middleware, no session, no coordinator call) at the same concurrency, in alternate rounds.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from jitmesh import Client
from tests.support.swarm import Swarm, SwarmSettings

from .procs import Child, DevCoordinator, bin_path, cpu_seconds, free_port, spawn
from .scenarios import HOUR, MS, Sizes, _accepting, _say
from .stats import Scenario, percentile
from .swarmproc import run_links

PENDING = 100
REAL = (
    "real: jitmesh-coordinator dev process, jitmesh-web process (uvicorn, Starlette, SDK over "
    "gRPC), one env=prod swarm agent, httpx clients in the bench process (one connection each); "
    "baseline: the same web server's /healthz"
)


@dataclass
class _Load:
    latencies: list[float]
    requests: int
    seconds: float
    failures: int = 0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


async def _load(
    base: str, path: str, cookies: httpx.Cookies, callers: int, seconds: float
) -> _Load:
    """`callers` clients, each on its own connection, GET `path` back to back for `seconds`."""
    latencies: list[float] = []
    failures = 0
    stop = time.monotonic() + seconds

    async def caller() -> None:
        nonlocal failures
        async with httpx.AsyncClient(base_url=base, cookies=cookies, timeout=60.0) as http:
            while time.monotonic() < stop:
                started = time.perf_counter()
                answer = await http.get(path)
                latencies.append(time.perf_counter() - started)
                if answer.status_code != 200:
                    failures += 1

    started = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return _Load(latencies, len(latencies), time.monotonic() - started, failures)


async def _sign_in(base: str, token: str) -> httpx.Cookies:
    async with httpx.AsyncClient(base_url=base, timeout=30.0) as browser:
        page = await browser.get("/signin")
        found = re.search(r'name="csrf" value="([^"]+)"', page.text)
        if found is None:
            raise RuntimeError("the sign-in page has no form token")
        answer = await browser.post(
            "/signin/token",
            data={"csrf": found.group(1), "token": token, "next": "/"},
            headers={"origin": base},
        )
        if answer.status_code != 303 or "jm_session" not in browser.cookies:
            raise RuntimeError(f"sign-in failed: {answer.status_code}")
        return httpx.Cookies({"jm_session": browser.cookies["jm_session"]})


async def run(tmp: Path, sizes: Sizes) -> list[Scenario]:
    callers, seconds, rounds = sizes.web
    scenario = Scenario(
        "16 web review page",
        f"{PENDING} pending requests, {callers} concurrent clients, {rounds} x {seconds:.0f} s",
        REAL,
    )
    started = time.monotonic()
    coord = DevCoordinator(tmp / "coordinator", free_port())
    children: list[Child] = []
    task: asyncio.Task[None] | None = None
    try:
        await coord.start()
        swarm = Swarm(
            SwarmSettings(
                target=coord.address,
                join_token=coord.join_token,
                count=1,
                credentials_dir=tmp / "credentials",
                prefix="web-prod",
                labels={"env": "prod"},
            )
        )
        task = asyncio.create_task(run_links(swarm))
        await swarm.wait_connected(1, within=60)
        agent = swarm.agents[0].name
        async with await Client.connect(
            coord.address, token=coord.token("alice"), insecure=True
        ) as alice:
            for k in range(PENDING):
                _, grant = await alice.create_request(
                    agent=agent, action="deploy", duration=HOUR, reason=f"bench {k}"
                )
                assert grant is None, "the dev policy approves env=prod requests by hand"
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        web = spawn(
            [bin_path("jitmesh-web"), "--coordinator", coord.address, "--listen",
             f"127.0.0.1:{port}", "--dev-token-sign-in", "--insecure-cookies",
             "--log-level", "warning"],
            tmp / "web.log",
            # The dev coordinator speaks plain text on loopback (its dev.env says the same).
            env={"JITMESH_INSECURE": "1"},
        )  # fmt: skip
        children.append(web)
        await _accepting(port, 30)
        cookies = await _sign_in(base, coord.token("bob"))
        async with httpx.AsyncClient(base_url=base, cookies=cookies, timeout=30.0) as http:
            page = await http.get("/")
        listed = len(set(re.findall(r'href="/requests/(req[^"]+)"', page.text)))
        if page.status_code != 200 or listed < PENDING:
            raise RuntimeError(f"the review page lists {listed} requests, not {PENDING}")
        _say(f"web: bob's page lists {listed} requests; {rounds} rounds of load")
        pages: list[_Load] = []
        healthz: list[_Load] = []
        web_cpu = coord_cpu = 0.0
        for _ in range(rounds):
            healthz.append(await _load(base, "/healthz", cookies, callers, seconds))
            w0, c0 = cpu_seconds(web.pid), cpu_seconds(coord.pid)
            pages.append(await _load(base, "/", cookies, callers, seconds))
            web_cpu += cpu_seconds(web.pid) - w0
            coord_cpu += cpu_seconds(coord.pid) - c0
        page_lat = [x * MS for load in pages for x in load.latencies]
        base_lat = [x * MS for load in healthz for x in load.latencies]
        page_n = sum(load.requests for load in pages)
        page_rate = page_n / sum(load.seconds for load in pages)
        base_rate = sum(load.requests for load in healthz) / sum(load.seconds for load in healthz)
        scenario.add(
            "pages/s", page_rate, base_rate, unit="/s",
            note="baseline: the same jitmesh-web server's /healthz at the same concurrency",
        )  # fmt: skip
        scenario.add("p50", percentile(page_lat, 50), percentile(base_lat, 50))
        scenario.add("p99", percentile(page_lat, 99), percentile(base_lat, 99))
        scenario.add("web CPU per page", web_cpu / page_n * MS, unit="ms")
        scenario.add("coordinator CPU per page", coord_cpu / page_n * MS, unit="ms")
        failures = sum(load.failures for load in pages + healthz)
        scenario.add("answers other than 200", float(failures), unit="", target="0")
        scenario.extra["listed"] = listed
        scenario.extra["page_bytes"] = len(page.content)
    except Exception as exc:  # reported; what was measured stays
        print(f"bench: web scenario failed: {exc!r}", file=sys.stderr)
        if not scenario.rows:
            scenario.error = f"{type(exc).__name__}: {exc}"
    finally:
        for child in children:
            child.stop()
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        coord.stop()
    scenario.seconds = time.monotonic() - started
    return [scenario]
