"""Enrollment attacked through the real interfaces (a TLS coordinator, raw gRPC, jitctl): the CA
signs nothing for a caller without a valid join token, enrollment floods are limited per address
and overall, a join token cannot take over an enrolled agent's name or add labels of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import jitmesh
from agent.identity import new_key_and_csr
from jitmesh import Client, InvalidArgumentError, NotFoundError, PermissionDeniedError
from jitmesh.types import AuditEvent
from jitmesh.v1 import agentlink_pb2, agents_pb2
from jitmesh.v1.agentlink_pb2_grpc import AgentLinkStub
from jitmesh.v1.agents_pb2_grpc import AgentsStub
from server.ca import InternalCA, Issued
from tests.e2e import procs
from tests.security.test_mtls import Tls, connect_as, read_until_error, refused_as, serving_tls


@pytest.fixture
async def tls(tmp_path: Path) -> AsyncIterator[Tls]:
    async with serving_tls(tmp_path) as serving:
        yield serving


async def enroll(
    tls: Tls, token: str, name: str, *, labels: dict[str, str] | None = None, csr: bytes = b""
) -> agents_pb2.EnrollResponse:
    """One raw Enroll call, as an agent (or an attacker) makes it."""
    csr = csr or new_key_and_csr(name)[1]
    async with grpc.aio.secure_channel(tls.address, grpc.ssl_channel_credentials(tls.ca_pem)) as ch:
        response: agents_pb2.EnrollResponse = await AgentsStub(ch).Enroll(
            agents_pb2.EnrollRequest(join_token=token, name=name, csr=csr, labels=labels or {}),
            timeout=10,
        )
        return response


async def refused(tls: Tls, token: str, name: str, **kwargs: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await enroll(tls, token, name, **kwargs)
    assert not token or token not in (error.value.details() or "")
    code = error.value.code()
    assert code is not None
    return code


async def audit(tls: Tls, kind: str) -> list[AuditEvent]:
    return [e for e in await tls.admin.list_audit(since=None) if e.kind == kind]


def count_signatures(ca: InternalCA, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every agent certificate the CA signs (the real CA still signs it)."""
    signed: list[str] = []
    original = ca.sign_agent_csr

    def spy(csr_pem: bytes, agent: str, *args: Any, **kwargs: Any) -> Issued:
        issued = original(csr_pem, agent, *args, **kwargs)
        signed.append(agent)
        return issued

    monkeypatch.setattr(ca, "sign_agent_csr", spy)
    return signed


async def test_the_ca_signs_nothing_before_the_join_token_is_checked(
    tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tls.coordinator.ca is not None
    signed = count_signatures(tls.coordinator.ca, monkeypatch)
    # No token, a forged one, and a spent one: refused, and the CA never signed.
    token = await tls.join_token()
    await enroll(tls, token, "web-1")
    assert signed == ["web-1"]
    for bad in ("", "jmj_forged-0000000000000000", token):
        assert await refused(tls, bad, "web-2") == grpc.StatusCode.UNAUTHENTICATED
    assert signed == ["web-1"]
    # A valid token with a CSR the CA refuses: nothing signed, nothing spent.
    fresh = await tls.join_token()
    assert await refused(tls, fresh, "web-2", csr=b"not a csr") == grpc.StatusCode.INVALID_ARGUMENT
    assert await refused(tls, fresh, "web-2", csr=b"x" * 9000) == grpc.StatusCode.INVALID_ARGUMENT
    assert (await enroll(tls, fresh, "web-2")).agent == "web-2"
    assert signed == ["web-1", "web-2"]
    reasons = [e.details.get("reason", "") for e in await audit(tls, "agent.enroll_refused")]
    # (the oversized CSR is refused before the token is looked at, so it is not audited)
    assert len(reasons) == 4
    assert reasons.count("join token is not valid, used up or expired") == 3
    assert all(token not in r and fresh not in r for r in reasons)
    refusals = await audit(tls, "agent.enroll_refused")
    assert {(e.agent, e.details.get("peer")) for e in refusals} == {("web-2", "127.0.0.1")}


async def test_enrollment_floods_are_limited_per_address_and_overall(tmp_path: Path) -> None:
    async with serving_tls(tmp_path / "a", enroll_rate=0.001, enroll_burst=3) as tls:
        codes = [await refused(tls, "jmj_guess", f"web-{i}") for i in range(6)]
        assert codes[:3] == [grpc.StatusCode.UNAUTHENTICATED] * 3
        assert codes[3:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
        # A genuine token from the flooding address waits too: nothing is signed meanwhile.
        token = await tls.join_token()
        assert await refused(tls, token, "web-1") == grpc.StatusCode.RESOURCE_EXHAUSTED
        # One audit entry per run of refusals, not one per refused call.
        limited = [
            e
            for e in await audit(tls, "agent.enroll_refused")
            if e.details.get("reason") == "rate limited"
        ]
        assert [e.details.get("peer") for e in limited] == ["127.0.0.1"]
        # Operators (authenticated calls) are served as before.
        assert await tls.admin.list_agents() == []
    async with serving_tls(
        tmp_path / "b",
        enroll_rate=1000.0,
        enroll_burst=1000,
        enroll_overall_rate=0.001,
        enroll_overall_burst=2,
    ) as tls:
        codes = [await refused(tls, "jmj_guess", f"web-{i}") for i in range(4)]
        assert (
            codes
            == [grpc.StatusCode.UNAUTHENTICATED] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        )
        reasons = [e.details.get("reason") for e in await audit(tls, "agent.enroll_refused")]
        assert reasons.count("rate limited (all)") == 1


async def test_a_join_token_cannot_take_over_an_enrolled_agents_name(tls: Tls) -> None:
    key, cert = await tls.enroll("web-1", labels={})
    assert await connect_as(tls, key, cert) == grpc.StatusCode.OK
    token = await tls.join_token()
    assert await refused(tls, token, "web-1") == grpc.StatusCode.FAILED_PRECONDITION
    # The genuine agent is untouched, and the refused token was not spent.
    assert await connect_as(tls, key, cert) == grpc.StatusCode.OK
    assert (await enroll(tls, token, "web-2")).agent == "web-2"
    [event] = await audit(tls, "agent.enroll_refused")
    assert event.agent == "web-1"
    assert "enrolled" in event.details["reason"]
    assert await audit(tls, "agent.replaced") == []
    # Once removed, the name is free for an ordinary token again.
    await tls.admin.remove_agent("web-1")
    assert (await enroll(tls, await tls.join_token(), "web-1")).agent == "web-1"
    assert [e.agent for e in await audit(tls, "agent.reenrolled")] == ["web-1"]


async def test_a_replacement_token_re_enrolls_only_its_agent_and_cuts_the_old_one(
    tls: Tls,
) -> None:
    token = await tls.join_token({"env": "prod"})
    old_key, old_cert = await tls.enroll("web-1", token, labels={"env": "prod"})
    creds = grpc.ssl_channel_credentials(tls.ca_pem, old_key, old_cert)
    async with grpc.aio.secure_channel(tls.agent_address, creds) as ch:
        call = AgentLinkStub(ch).Connect(None)
        await call.write(
            agentlink_pb2.AgentMessage(
                hello=agentlink_pb2.Hello(agent="web-1", version=jitmesh.__version__)
            )
        )
        first = await call.read()
        assert isinstance(first, agentlink_pb2.CoordinatorMessage)
        assert first.HasField("welcome")
        replacement = await jitctl(
            tls, "-o", "json", "agent", "token", "create", "--replace", "web-1"
        )
        secret = replacement.split('"token": "')[1].split('"')[0]
        # The replacement token enrolls web-1 and nothing else.
        assert await refused(tls, secret, "web-2") == grpc.StatusCode.PERMISSION_DENIED
        new_key, new_cert = await tls.enroll("web-1", secret)
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await read_until_error(call)
        assert (cut.value.code(), cut.value.details()) == (
            grpc.StatusCode.UNAVAILABLE,
            "agent replaced by a new enrollment",
        )
    assert await refused_as(tls, old_key, old_cert) == grpc.StatusCode.UNAUTHENTICATED
    assert await connect_as(tls, new_key, new_cert) == grpc.StatusCode.OK
    # The replacement kept the agent's labels, and both steps are in the audit log.
    assert (await tls.admin.get_agent("web-1")).labels == {"env": "prod"}
    [created] = [
        e
        for e in await audit(tls, "agent.join_token_created")
        if e.details.get("replaces") == "web-1"
    ]
    assert created.details["labels"] == "env=prod"
    assert [e.agent for e in await audit(tls, "agent.replaced")] == ["web-1"]
    # A replacement token for an agent that does not exist is refused.
    with pytest.raises(Exception, match="no such agent"):
        await tls.admin.create_join_token(replaces="web-9")


async def test_labels_come_from_the_join_token_only(tls: Tls) -> None:
    token = await tls.join_token({"env": "prod"})
    for asked in ({"env": "prod", "role": "admin"}, {"env": "staging"}, {"tier": "db"}):
        assert await refused(tls, token, "db-1", labels=asked) == grpc.StatusCode.PERMISSION_DENIED
    events = await audit(tls, "agent.enroll_refused")
    assert len(events) == 3
    assert all("labels" in e.details["reason"] for e in events)
    # Asking for the token's own labels (or none) is fine: the agent gets exactly the token's.
    await enroll(tls, token, "db-1", labels={"env": "prod"})
    assert (await tls.admin.get_agent("db-1")).labels == {"env": "prod"}
    await enroll(tls, await tls.join_token({"env": "prod", "tier": "db"}), "db-2")
    assert (await tls.admin.get_agent("db-2")).labels == {"env": "prod", "tier": "db"}


async def jitctl(tls: Tls, *args: str) -> str:
    ca_file = tls.root / "ca.pem"
    ca_file.write_bytes(tls.ca_pem)
    env = {
        "JITMESH_TOKEN": "jmt_test-admin",
        "JITMESH_COORDINATOR": tls.address,
        "JITMESH_CA_FILE": str(ca_file),
    }
    code, out, err = await procs.jitctl(*args, env=env)
    assert code == 0, err
    return out


async def test_renewal_with_a_retired_certificate_signs_nothing(
    tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_key, first_cert = await tls.enroll("web-1")
    await tls.enroll("web-1", await tls.join_token(replaces="web-1"))
    assert tls.coordinator.ca is not None
    signed = count_signatures(tls.coordinator.ca, monkeypatch)
    _, csr = new_key_and_csr("web-1")
    creds = grpc.ssl_channel_credentials(tls.ca_pem, first_key, first_cert)
    async with grpc.aio.secure_channel(tls.agent_address, creds) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused_renewal:
            await AgentsStub(ch).RenewCertificate(
                agents_pb2.RenewCertificateRequest(csr=csr), timeout=10
            )
    assert refused_renewal.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert signed == []


async def test_join_tokens_can_be_listed_and_revoked(tls: Tls) -> None:
    # Issue 10 item 4: a leaked join token could not be cancelled.
    made = await tls.admin.create_join_token(labels={"env": "prod"})
    assert (len(made.id), made.labels, made.replaces) == (16, {"env": "prod"}, "")
    assert made.token[:16] != made.id
    [listed] = await tls.admin.list_join_tokens()
    assert (listed.id, listed.labels, listed.uses_left, listed.created_by) == (
        made.id,
        {"env": "prod"},
        1,
        "admin",
    )
    assert made.token not in repr(listed)
    revoked = await tls.admin.revoke_join_token(made.id, reason="leaked in a ticket")
    assert revoked.revoked_at is not None
    assert revoked.revoked_by == "admin"
    assert await tls.admin.list_join_tokens() == []
    assert [t.id for t in await tls.admin.list_join_tokens(include_ended=True)] == [made.id]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await tls.enroll("web-1", made.token)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(NotFoundError):
        await tls.admin.revoke_join_token(made.id)
    with pytest.raises(InvalidArgumentError, match="16 hexadecimal"):
        await tls.admin.revoke_join_token("jmj_" + made.token)
    async with await Client.connect(
        tls.address, token="jmt_test-alice", credentials=grpc.ssl_channel_credentials(tls.ca_pem)
    ) as alice:
        with pytest.raises(PermissionDeniedError):
            await alice.list_join_tokens()
    kinds = [e.kind for e in await tls.admin.list_audit(kind="agent.join_token_revoked")]
    assert kinds == ["agent.join_token_revoked"]

    # A used token lists the agent it enrolled; a replacement token says what it replaces.
    used = await tls.admin.create_join_token(labels={"env": "prod"})
    await tls.enroll("web-2", used.token)
    [after] = [t for t in await tls.admin.list_join_tokens(include_ended=True) if t.id == used.id]
    assert (after.uses_left, after.used_by) == (0, ("web-2",))
    replacing = await tls.admin.create_join_token(replaces="web-2")
    assert (replacing.replaces, replacing.labels) == ("web-2", {"env": "prod"})
