"""How to keep one audit chain across replicas on PostgreSQL: a measurement (docs/scaling.md).

Two stores on one database (separate connection pools, i.e. two replicas as PostgreSQL sees
them), each with `--tasks` concurrent writers, each writer looping over the write the
coordinator does most (a request with its grant, a command in the agent's log, three audit
events) for `--seconds`. Three ways, run one after the other on fresh schemas:

- head-first: every write transaction locks the chain's head row first (what the store does);
- head-lazy: the head is locked at the transaction's first audit event (more overlap; lock-order
  deadlocks between replicas are detected by PostgreSQL and the store runs the write again);
- no-chain: the same write without audit events, the ceiling that any scheme moving the chain
  out of the transaction (an advisory-lock leader chaining committed events) could approach.

    python -m bench.chain [--seconds 5] [--tasks 8] [--dsn postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from datetime import UTC, datetime, timedelta

import psycopg

from jitmesh.types import Grant, GrantState, OfflineMode, OfflinePolicy, Request, RequestState
from server.domain.audit import verify_chain
from server.domain.models import AuditEntry, AuditKind, CommandKind, new_id
from server.domain.ports import Tx
from server.store.postgres import PostgresStore, with_schema

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _request_and_grant(agent: str) -> tuple[Request, Grant]:
    request = Request(
        id=new_id("req"), subject="alice", agent=agent, action="deploy",
        duration=timedelta(minutes=15), reason="", state=RequestState.APPROVED, rule="r",
        approvals_required=0, approver_groups=(), reviews=(), created_at=T0,
        pending_expires_at=None, decided_at=T0, decided_by="policy:r", decision_reason="",
        grant_id="", grant_state=None,
    )  # fmt: skip
    grant = Grant(
        id=new_id("grt"), request_id=request.id, agent=agent, subject="alice", action="deploy",
        not_before=T0, not_after=T0 + timedelta(minutes=15), state=GrantState.PENDING_DELIVERY,
        offline=OfflinePolicy(OfflineMode.HOLD, timedelta(0)), created_at=T0,
    )  # fmt: skip
    return request, grant


async def _run(dsn: str, mode: str, seconds: float, tasks: int, agents: int) -> dict[str, object]:
    schema = "bench_chain_" + secrets.token_hex(4)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(f"CREATE SCHEMA {schema}")
    try:
        url = with_schema(dsn, schema)
        stores = [await PostgresStore.open(url, min_size=tasks, max_size=tasks) for _ in range(2)]
        for store in stores:
            store.head_first = mode == "head-first"
        async with stores[0].transaction() as tx:
            for i in range(agents):
                await tx.enroll_agent(f"web-{i}", {}, f"h{i}", T0)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def writer(store: PostgresStore, k: int) -> None:
            n = 0
            while time.perf_counter() < deadline:
                agent = f"web-{(k + n) % agents}"
                n += 1
                request, grant = _request_and_grant(agent)

                async def work(
                    tx: Tx, request: Request = request, grant: Grant = grant, agent: str = agent
                ) -> None:
                    await tx.insert_requests([request])
                    await tx.insert_grants([grant])
                    await tx.append_commands([(agent, CommandKind.GRANT, grant.id, T0)])
                    if mode != "no-chain":
                        kinds = (
                            AuditKind.REQUEST_CREATED,
                            AuditKind.REQUEST_APPROVED,
                            AuditKind.GRANT_CREATED,
                        )
                        await tx.audit_many(
                            [AuditEntry(kind, "alice", T0, grant_id=grant.id) for kind in kinds]
                        )

                started = time.perf_counter()
                await store.write(work)
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(writer(s, k) for s in stores for k in range(tasks)))
        elapsed = time.perf_counter() - began
        chain = await stores[0].audit_chain(0, 10_000_000)
        ok = verify_chain(chain).ok if chain else True
        retries = sum(s.retries for s in stores)
        for store in stores:
            await store.close()
        latencies.sort()
        return {
            "mode": mode,
            "writes_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
            "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
            "retries": retries,
            "events": len(chain),
            "chain_ok": ok,
        }
    finally:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.chain")
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--tasks", type=int, default=8, help="writers per replica")
    parser.add_argument("--agents", type=int, default=50)
    args = parser.parse_args()
    for mode in ("head-first", "head-lazy", "no-chain"):
        result = await _run(args.dsn, mode, args.seconds, args.tasks, args.agents)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
