"""A coordinator process serving TLS from its internal CA, set up like `jitmesh-coordinator dev`
(the dev policy and users, a reusable join token, no rate limits, the fleet scenarios' heartbeat
and keepalive), for the fan-out over mTLS (scenario 14). `dev` itself speaks plain text only and
`serve` starts with no users and with rate limits on enrollment and requests (which would time
the limits, not the transport), so the bench composes the same `server.app.build` with
`tls=True` here: operators and enrolling agents on PORT with server-side TLS, AgentLink on
AGENT_PORT with client certificates. Writes DATA/dev.env (tokens, join token) and DATA/ca/ca.pem
before its ports serve, as `dev` does, and sets the garbage collector as `jitmesh-coordinator`
does (`server.app.tune_gc`).

    python -m bench.tlscoord DATA PORT AGENT_PORT
"""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import timedelta
from pathlib import Path

from server.app import Coordinator, build, tune_gc
from server.config import CoordinatorConfig
from server.domain.models import ADMIN_GROUP, Principal
from server.domain.policy import DEV_POLICY

USERS = {"alice": ["developers"], "bob": ["sre"], "admin": [ADMIN_GROUP]}


async def serve(data: Path, port: int, agent_port: int) -> None:
    config = CoordinatorConfig(
        data_dir=data,
        host="127.0.0.1",
        port=port,
        agent_port=agent_port,
        tls=True,
        default_policy=DEV_POLICY,
        heartbeat=timedelta(seconds=30),
        keepalive=timedelta(seconds=60),
        keepalive_timeout=timedelta(seconds=20),
        # As the fleet scenarios' coordinator: the lock rounds count their commands from the log.
        command_log_retention=timedelta(0),
    )

    async def credentials(coordinator: Coordinator) -> None:
        lines = []
        for user, groups in USERS.items():
            token = f"jmt_bench-tls-{user}"
            await coordinator.identity.ensure_user(user, groups, token)
            lines.append(f"JITMESH_TOKEN_{user.upper()}={token}")
        join = "jmj_bench-tls-join"
        admin = Principal("admin", frozenset({ADMIN_GROUP}))
        await coordinator.fleet.create_join_token(admin, {}, None, max_uses=None, token=join)
        lines.append(f"JITMESH_JOIN_TOKEN={join}")
        (data / "dev.env").write_text("\n".join(lines) + "\n")

    coordinator = await build(config, before_serving=credentials)
    # As `jitmesh-coordinator` does once built: without it this process ran CPython's default
    # collector, so scenario 14's CPU per agent measured the collector beside TLS (1,712 us
    # against scenario 3's 961 us in one run, 2026-12-07).
    tune_gc()
    await coordinator.run()


def main(argv: list[str] | None = None) -> int:
    data, port, agent_port = (argv or sys.argv[1:])[:3]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    Path(data).mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(Path(data), int(port), int(agent_port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
