"""The coordinator's record says what the agents did, and nothing else (issue 9, items A and B).

Driven at the wire with a raw AgentLink stream against the real coordinator: snapshots take
their own sequence number and are booked grant by grant from the ack's results; duplicate and
not-applied acks change nothing and audit nothing; acks lost in a coordinator crash are settled
from the next Hello."""

from __future__ import annotations

from datetime import datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from jitmesh import GrantState
from jitmesh.v1 import agentlink_pb2
from tests.server.helpers import T0, Env, agent_link

M15 = timedelta(minutes=15)
A = agentlink_pb2


_PAIRS = [("alice", "deploy"), ("alice", "restart"), ("dave", "deploy"), ("dave", "logs")]
_used: dict[int, int] = {}


async def prod_grant(env: Env) -> tuple[str, str]:
    """A grant on db-1 (approved by bob), each time for another subject and action (a request
    for a pair held live would reuse its grant): (request id, grant id)."""
    n = _used[id(env)] = _used.get(id(env), -1) + 1
    subject, action = _PAIRS[n % len(_PAIRS)]
    request, _ = await env.clients[subject].create_request(
        agent="db-1", action=action, duration=M15, reason="release 42"
    )
    request, grant = await env.bob.approve(request.id)
    assert grant is not None
    return request.id, grant.id


def ts(at: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(at)
    return out


def hello(
    last_applied_seq: int = 0,
    active: tuple[str, ...] = (),
    removing: tuple[str, ...] = (),
    version: str = "0.2.0",
) -> A.AgentMessage:
    return A.AgentMessage(
        hello=A.Hello(
            agent="db-1",
            last_applied_seq=last_applied_seq,
            active_grant_ids=list(active),
            removing_grant_ids=list(removing),
            version=version,
            boot_id="b1",
        )
    )


def ack(
    seq: int, status: A.AckStatus.ValueType, grant_id: str = "", reason: str = "", **more: object
) -> A.AgentMessage:
    return A.AgentMessage(
        ack=A.Ack(seq=seq, status=status, grant_id=grant_id, reason=reason, **more)  # type: ignore[arg-type]
    )


async def barrier(link: object, n: int) -> None:
    """An event round trip: every message sent before it has been processed."""
    from tests.server.helpers import AgentLink

    assert isinstance(link, AgentLink)
    observed = ts(T0)
    await link.send(
        A.AgentMessage(event=A.AgentEvent(event_id=f"sync-{n}", kind="note", observed_at=observed))
    )
    await link.next("event_ack")


async def kinds(env: Env, grant_id: str) -> list[str]:
    return [e.kind for e in await env.admin.list_audit(grant_id=grant_id)]


# A. Snapshots.


async def test_a_snapshot_takes_its_own_seq_and_books_every_grant_by_its_result(
    env: Env,
) -> None:
    _, held = await prod_grant(env)  # seq 1
    _, refused = await prod_grant(env)  # seq 2
    _, revoked = await prod_grant(env)  # seq 3
    await env.admin.revoke_grant(revoked)  # seq 4: REVOKING, never acknowledged
    # The agent lost its lease table: a snapshot, under a new sequence number of its own.
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(hello(last_applied_seq=0))
        welcome = (await link.next("welcome")).welcome
        seq, body = await link.command()
        assert body.WhichOneof("kind") == "snapshot"
        assert seq == body.seq == 5, "the snapshot reuses the number of a real command"
        assert welcome.resume_after_seq == 5
        assert sorted(g.grant_id for g in body.snapshot.grants) == sorted([held, refused])
        assert list(body.snapshot.tombstones) == [revoked]
        applied_at = env.clock.now() - timedelta(seconds=2)
        await link.send(
            ack(
                seq,
                A.ACK_STATUS_APPLIED,
                reason="held 1, refused 1",
                results=[
                    A.GrantResult(
                        grant_id=held, status=A.ACK_STATUS_APPLIED, applied_at=ts(applied_at)
                    ),
                    A.GrantResult(
                        grant_id=refused, status=A.ACK_STATUS_REJECTED, reason="tombstoned"
                    ),
                    A.GrantResult(grant_id=revoked, status=A.ACK_STATUS_APPLIED),
                ],
            )
        )
        await barrier(link, 1)
    got = {g: await env.admin.get_grant(g) for g in (held, refused, revoked)}
    assert got[held].state is GrantState.ACTIVE
    assert got[held].applied_at is not None
    assert got[refused].state is GrantState.FAILED
    assert got[refused].applied_at is None
    assert got[revoked].state is GrantState.REVOKED
    assert (await kinds(env, held)).count("grant.applied") == 1
    assert "grant.applied" not in await kinds(env, refused)
    assert "grant.apply_failed" in await kinds(env, refused)
    assert "grant.revoked" in await kinds(env, revoked)
    assert (await env.admin.get_agent("db-1")).last_acked_seq == 5
    assert (await env.admin.verify_audit()).ok


async def test_commands_before_an_acknowledged_snapshot_are_not_sent_again(env: Env) -> None:
    _, first = await prod_grant(env)  # seq 1
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(hello(last_applied_seq=0))
        await link.next("welcome")
        seq, _ = await link.command()
        await link.send(
            ack(
                seq,
                A.ACK_STATUS_APPLIED,
                results=[A.GrantResult(grant_id=first, status=A.ACK_STATUS_APPLIED)],
            )
        )
        await barrier(link, 1)
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(hello(last_applied_seq=seq, active=(first,)))
        welcome = (await link.next("welcome")).welcome
        assert welcome.resume_after_seq == seq
        _, second = await prod_grant(env)
        next_seq, body = await link.command()
        assert (next_seq, body.grant.grant_id) == (seq + 1, second)


async def test_a_snapshot_ack_names_only_grants_of_this_agent(env: Env) -> None:
    _, staging = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
    assert staging is not None
    await prod_grant(env)
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(hello(last_applied_seq=0))
        await link.next("welcome")
        seq, _ = await link.command()
        await link.send(
            ack(
                seq,
                A.ACK_STATUS_APPLIED,
                results=[A.GrantResult(grant_id=staging.id, status=A.ACK_STATUS_APPLIED)],
            )
        )
        assert await link.ended() is not None
    assert (await env.admin.get_grant(staging.id)).state is GrantState.PENDING_DELIVERY


# B. Duplicates, commands not applied, and acks lost in a crash.


async def test_a_duplicate_ack_changes_nothing_and_audits_nothing(env: Env) -> None:
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(hello())
        await link.next("welcome")
        _, grant_id = await prod_grant(env)
        seq, _ = await link.command()
        await link.send(ack(seq, A.ACK_STATUS_DUPLICATE, grant_id))
        await barrier(link, 1)
    assert (await env.admin.get_grant(grant_id)).state is GrantState.PENDING_DELIVERY
    assert [k for k in await kinds(env, grant_id) if k.startswith("grant.")] == ["grant.created"]


async def test_a_not_applied_ack_changes_nothing_and_audits_nothing(env: Env) -> None:
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(hello())
        await link.next("welcome")
        _, grant_id = await prod_grant(env)
        seq, _ = await link.command()
        await link.send(ack(seq, A.ACK_STATUS_NOT_APPLIED, grant_id, "superseded by snapshot 9"))
        await barrier(link, 1)
    grant = await env.admin.get_grant(grant_id)
    assert (grant.state, grant.applied_at, grant.failure) == (GrantState.PENDING_DELIVERY, None, "")
    assert [k for k in await kinds(env, grant_id) if k.startswith("grant.")] == ["grant.created"]


async def test_a_previous_release_agents_duplicate_is_read_as_a_duplicate(env: Env) -> None:
    """0.1 agents ack a duplicate as APPLIED with reason "duplicate", also for commands a
    snapshot had replaced: from them, that is a duplicate, never an application."""
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(hello(version="0.1.0"))
        await link.next("welcome")
        _, grant_id = await prod_grant(env)
        seq, body = await link.command()
        assert body.WhichOneof("kind") == "grant"
        await link.send(ack(seq, A.ACK_STATUS_APPLIED, grant_id, "duplicate"))
        await barrier(link, 1)
    assert (await env.admin.get_grant(grant_id)).state is GrantState.PENDING_DELIVERY
    assert "grant.applied" not in await kinds(env, grant_id)


async def test_acks_lost_in_a_crash_are_settled_from_the_hello(env: Env) -> None:
    """The agent applied seq 1-3 (grant, grant, revoke of the first) but the coordinator never
    recorded the acks: the Hello's active and removing lists settle them at once."""
    # The coordinator recorded the grant acks of `removed` and `stuck` only.
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(hello())
        await link.next("welcome")
        _, kept = await prod_grant(env)  # seq 1
        _, removed = await prod_grant(env)  # seq 2
        _, stuck = await prod_grant(env)  # seq 3
        for _ in range(3):
            seq, body = await link.command()
            if body.grant.grant_id != kept:
                await link.send(ack(seq, A.ACK_STATUS_APPLIED, body.grant.grant_id))
        await barrier(link, 1)
    await env.admin.revoke_grant(removed)  # seq 4
    await env.admin.revoke_grant(stuck)  # seq 5
    # The agent applied 1-5; the grant ack of seq 1 and both revoke acks were lost; the removal
    # for `stuck` failed and is being retried on the host.
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(hello(last_applied_seq=5, active=(kept,), removing=(stuck,)))
        welcome = (await link.next("welcome")).welcome
        assert welcome.resume_after_seq == 5
        await barrier(link, 1)
    assert (await env.admin.get_grant(kept)).state is GrantState.ACTIVE
    assert (await env.admin.get_grant(removed)).state is GrantState.REVOKED
    assert (await env.admin.get_grant(stuck)).state is GrantState.REVOKE_FAILED
    applied = [e for e in await env.admin.list_audit(kind="grant.applied") if e.grant_id == kept]
    assert [e.details.get("source") for e in applied] == ["hello"]
    assert (await env.admin.verify_audit()).ok


async def test_a_resent_command_acked_duplicate_after_the_hello_settled_it(env: Env) -> None:
    """The resume rule still resends what is unacknowledged; the agent's DUPLICATE for it
    changes nothing (one grant.applied, from the Hello)."""
    _, grant_id = await prod_grant(env)  # seq 1, never acked
    _, other = await prod_grant(env)  # seq 2, not yet applied by the agent
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(hello(last_applied_seq=1, active=(grant_id,)))
        welcome = (await link.next("welcome")).welcome
        assert welcome.resume_after_seq == 1
        seq, body = await link.command()
        assert (seq, body.grant.grant_id) == (2, other)
        await link.send(ack(1, A.ACK_STATUS_DUPLICATE, grant_id))
        await barrier(link, 1)
    assert (await kinds(env, grant_id)).count("grant.applied") == 1


async def test_an_applied_ack_for_a_grant_ended_meanwhile_moves_nothing_back(env: Env) -> None:
    """The agent applied the grant, the coordinator expired it before the ack arrived: the
    record keeps EXPIRED and notes when the host applied it (audited once, as late)."""
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(hello())
        await link.next("welcome")
        _, grant_id = await prod_grant(env)
        seq, _ = await link.command()
        await env.clock.advance(M15 + timedelta(seconds=1))
        await env.coordinator.expirer.sweep(env.clock.now())
        assert (await env.admin.get_grant(grant_id)).state is GrantState.EXPIRED
        await link.send(ack(seq, A.ACK_STATUS_APPLIED, grant_id))
        await barrier(link, 1)
    grant = await env.admin.get_grant(grant_id)
    assert grant.state is GrantState.EXPIRED
    assert grant.applied_at == env.clock.now()
    applied = [e for e in await env.admin.list_audit(kind="grant.applied")]
    assert [(e.grant_id, e.details.get("late")) for e in applied] == [(grant_id, "true")]


async def test_a_duplicate_whose_original_ack_was_lost_books_the_agents_result(env: Env) -> None:
    """The agent applied the grant, its ack was lost, the grant then ended on the host (so the
    Hello cannot list it): the resent command's DUPLICATE carries what became of it, and that is
    booked once, as the lost ack would have been. A later duplicate changes nothing."""
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(hello())
        await link.next("welcome")
        _, grant_id = await prod_grant(env)
        seq, _ = await link.command()
    applied_at = env.clock.now()
    for _ in range(2):
        async with agent_link(env.address, env.credentials["db-1"]) as link:
            await link.send(hello(last_applied_seq=seq))
            if (await link.next("welcome")).welcome.resume_after_seq == seq - 1:
                assert (await link.command())[0] == seq  # resent: its ack is still missing
            await link.send(
                ack(
                    seq,
                    A.ACK_STATUS_DUPLICATE,
                    grant_id,
                    results=[
                        A.GrantResult(
                            grant_id=grant_id,
                            status=A.ACK_STATUS_APPLIED,
                            applied_at=ts(applied_at),
                        )
                    ],
                )
            )
            await barrier(link, 1)
    grant = await env.admin.get_grant(grant_id)
    assert (grant.state, grant.applied_at) == (GrantState.ACTIVE, applied_at)
    assert (await kinds(env, grant_id)).count("grant.applied") == 1
