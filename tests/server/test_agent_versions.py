"""Which agent versions the coordinator serves (docs/wire.md, "Mixed versions"; issue 9): its own
minor version and the one before; any other is refused at Hello with FAILED_PRECONDITION, a
message naming both versions and what to upgrade, and an `agent.version_refused` audit entry.
Driven at the wire with a raw AgentLink stream against the real coordinator."""

from __future__ import annotations

import grpc
import pytest

from jitmesh import __version__
from jitmesh.v1 import agentlink_pb2 as A
from jitmesh.versions import parse
from tests.server.helpers import Env, agent_link

_own = parse(__version__)
assert _own is not None, __version__
MAJOR, MINOR, _ = _own
assert MINOR >= 2, __version__
SAME = f"{MAJOR}.{MINOR}.7"
ONE_OLDER = f"{MAJOR}.{MINOR - 1}.0"

REFUSED = {
    # version -> what the refusal tells the operator to upgrade
    f"{MAJOR}.{MINOR - 2}.9": "upgrade the agent",
    f"{MAJOR}.{MINOR + 1}.0": "upgrade the coordinator first",
    f"{MAJOR + 1}.{MINOR}.0": "upgrade the coordinator first",
    "banana": "upgrade the agent",
    "": "upgrade the agent",
}


def hello(version: str) -> A.AgentMessage:
    return A.AgentMessage(hello=A.Hello(agent="db-1", version=version, boot_id="b1"))


@pytest.mark.parametrize("version", sorted(REFUSED))
async def test_an_agent_of_a_version_not_served_is_refused_at_hello(env: Env, version: str) -> None:
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(hello(version))
        assert await link.ended() is grpc.StatusCode.FAILED_PRECONDITION
        details = await link.call.details()
    shown = version or "unknown"
    assert f"agent version {shown} is not served by this coordinator ({__version__})" in details
    assert details.endswith(REFUSED[version])
    refused = await env.admin.list_audit(kind="agent.version_refused")
    assert [(e.agent, e.actor) for e in refused] == [("db-1", "agent:db-1")]
    assert refused[0].details == {"version": version, "coordinator_version": __version__}
    agent = await env.admin.get_agent("db-1")
    assert not agent.connected
    assert agent.version == ""  # a refused Hello records nothing of the agent
    assert (await env.admin.verify_audit()).ok


@pytest.mark.parametrize(("version", "compatibility"), [(SAME, "supported"), (ONE_OLDER, "compat")])
async def test_an_agent_of_this_or_the_previous_minor_version_is_served(
    env: Env, version: str, compatibility: str
) -> None:
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(hello(version))
        welcome = (await link.next("welcome")).welcome
        assert welcome.version == __version__
        agent = await env.admin.get_agent("db-1")
        assert (agent.connected, agent.version, agent.compatibility) == (
            True,
            version,
            compatibility,
        )
        listed = {a.name: a for a in await env.admin.list_agents()}
        assert listed["db-1"].compatibility == compatibility
        assert listed["web-1"].compatibility == ""  # never connected: no version known
    assert await env.admin.list_audit(kind="agent.version_refused") == []
