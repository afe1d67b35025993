"""Agent identity over mTLS, attacked through the real interfaces: a real coordinator serving TLS
from its internal CA, a real agent enrolling with a CSR, and raw gRPC clients presenting missing,
expired, not-yet-valid, foreign, self-signed, mismatched, revoked and replaced certificates."""

from __future__ import annotations

import asyncio
import contextlib
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import SecretStr

import jitmesh
from agent import app as agent_app
from agent.config import AgentConfig, FileEnforcerConfig
from agent.identity import new_key_and_csr
from jitmesh import AuthenticationError, Client, PermissionDeniedError
from jitmesh.v1 import agentlink_pb2, agents_pb2
from jitmesh.v1.agentlink_pb2_grpc import AgentLinkStub
from jitmesh.v1.agents_pb2_grpc import AgentsStub
from server.app import Coordinator, build
from server.ca import AGENT_URI, InternalCA
from server.config import CoordinatorConfig
from server.domain.models import ADMIN_GROUP, Principal
from server.domain.policy import DEV_POLICY

ADMIN = Principal("admin", frozenset({ADMIN_GROUP}))
RETRY = 0.01


@dataclass
class Tls:
    root: Path
    coordinator: Coordinator
    ca_pem: bytes
    admin: Client

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.coordinator.port}"

    @property
    def agent_address(self) -> str:
        return f"127.0.0.1:{self.coordinator.agent_port}"

    async def join_token(self, labels: dict[str, str] | None = None, replaces: str = "") -> str:
        token, _ = await self.coordinator.fleet.create_join_token(
            ADMIN, labels or {}, timedelta(hours=1), replaces=replaces
        )
        return token

    async def enroll(
        self, name: str, token: str | None = None, labels: dict[str, str] | None = None
    ) -> tuple[bytes, bytes]:
        """Enroll like an agent does; the key and certificate."""
        key_pem, csr = new_key_and_csr(name)
        creds = grpc.ssl_channel_credentials(self.ca_pem)
        async with grpc.aio.secure_channel(self.address, creds) as ch:
            response = await AgentsStub(ch).Enroll(
                agents_pb2.EnrollRequest(
                    join_token=token or await self.join_token(),
                    name=name,
                    csr=csr,
                    labels=labels or {},
                ),
                timeout=10,
            )
        assert response.agent_port == self.coordinator.agent_port
        return key_pem, bytes(response.certificate)


@contextlib.asynccontextmanager
async def serving_tls(root: Path, **config: Any) -> AsyncIterator[Tls]:
    """A coordinator serving TLS from its internal CA, with users alice and admin."""
    built = CoordinatorConfig(
        data_dir=root / "coordinator",
        port=0,
        agent_port=0,
        tls=True,
        default_policy=DEV_POLICY,
        **config,
    )
    coordinator = await build(built)
    for user, groups in {"alice": ["developers"], "admin": [ADMIN_GROUP]}.items():
        await coordinator.identity.ensure_user(user, groups, f"jmt_test-{user}")
    runner = asyncio.create_task(coordinator.run())
    assert coordinator.ca is not None
    ca_pem = coordinator.ca.ca_pem
    admin = await Client.connect(
        f"127.0.0.1:{coordinator.port}",
        token="jmt_test-admin",
        credentials=grpc.ssl_channel_credentials(ca_pem),
    )
    try:
        yield Tls(root, coordinator, ca_pem, admin)
    finally:
        await admin.close()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


@pytest.fixture
async def tls(tmp_path: Path) -> AsyncIterator[Tls]:
    async with serving_tls(tmp_path) as serving:
        yield serving


async def connect_as(
    tls: Tls, key_pem: bytes | None, cert_pem: bytes | None, *, name: str = "web-1"
) -> grpc.StatusCode:
    """Open AgentLink with this client certificate (or none); the status the stream ends with,
    or OK when the coordinator welcomed it.

    A client-side write or read racing the coordinator's refusal sometimes ends the call with
    gRPC core's own INTERNAL ("Internal error from Core") instead of the coordinator's status;
    that says nothing about the coordinator, so the attempt is made again (at most 5 times)."""
    for _ in range(4):
        code, details = await _connect_once(tls, key_pem, cert_pem, name)
        if not (code is grpc.StatusCode.INTERNAL and details == "Internal error from Core"):
            return code
    return (await _connect_once(tls, key_pem, cert_pem, name))[0]


async def _connect_once(
    tls: Tls, key_pem: bytes | None, cert_pem: bytes | None, name: str
) -> tuple[grpc.StatusCode, str | None]:
    if key_pem is None or cert_pem is None:
        creds = grpc.ssl_channel_credentials(tls.ca_pem)
    else:
        creds = grpc.ssl_channel_credentials(tls.ca_pem, key_pem, cert_pem)
    async with grpc.aio.secure_channel(tls.agent_address, creds) as ch:
        call = AgentLinkStub(ch).Connect(None, timeout=10)
        try:
            await call.write(
                agentlink_pb2.AgentMessage(
                    hello=agentlink_pb2.Hello(agent=name, version=jitmesh.__version__)
                )
            )
            first = await call.read()
        except grpc.aio.AioRpcError:
            return await call.code(), await call.details()
        if isinstance(first, agentlink_pb2.CoordinatorMessage) and first.HasField("welcome"):
            call.cancel()
            return grpc.StatusCode.OK, None
        return await call.code(), await call.details()


async def refused_as(tls: Tls, key_pem: bytes | None, cert_pem: bytes | None) -> grpc.StatusCode:
    """Open AgentLink with this client certificate (or none) and write nothing: the status the
    coordinator refuses it with. (A Hello written now could race the refusal, and gRPC then
    ends the call INTERNAL.) A certificate wrongly accepted would wait for its Hello instead and
    end DEADLINE_EXCEEDED here."""
    if key_pem is None or cert_pem is None:
        creds = grpc.ssl_channel_credentials(tls.ca_pem)
    else:
        creds = grpc.ssl_channel_credentials(tls.ca_pem, key_pem, cert_pem)
    async with grpc.aio.secure_channel(tls.agent_address, creds) as ch:
        call = AgentLinkStub(ch).Connect(None, timeout=5)
        code: grpc.StatusCode = await call.code()
        return code


async def read_until_error(call: object) -> None:
    async with asyncio.timeout(10):
        while True:
            await call.read()  # type: ignore[attr-defined]


def certificate(
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey,
    name: str,
    not_before: datetime,
    not_after: datetime,
) -> bytes:
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(AGENT_URI + name)]),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


async def test_an_agent_enrolls_with_a_csr_and_receives_grants_over_mtls_only(tls: Tls) -> None:
    state, access = tls.root / "agent", tls.root / "access"
    access.mkdir()
    ca_file = tls.root / "ca.pem"
    ca_file.write_bytes(tls.ca_pem)
    token = await tls.join_token({"env": "staging"})
    config = AgentConfig(
        coordinator=tls.address,
        name="web-1",
        labels={"env": "staging"},
        join_token=SecretStr(token),
        ca_file=ca_file,
        state_dir=state,
        enforcers=(FileEnforcerConfig(directory=access),),
        backoff_base=0.05,
        backoff_cap=0.2,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent_app.run(config, stop=stop))
    try:
        async with asyncio.timeout(15):
            while not tls.coordinator.registry.connected("web-1"):
                await asyncio.sleep(RETRY)
        alice = await Client.connect(
            tls.address,
            token="jmt_test-alice",
            credentials=grpc.ssl_channel_credentials(tls.ca_pem),
        )
        async with alice:
            _, grant = await alice.create_request(
                agent="web-1", action="deploy", duration=timedelta(minutes=5)
            )
        assert grant is not None
        async with asyncio.timeout(10):
            while not (access / "alice:deploy").exists():
                await asyncio.sleep(RETRY)
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task
    # The key never left the host and is private; no bearer credential exists.
    identity = state / "tls_identity.json"
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    assert not (state / "credential").exists()
    # The CA's files are private too.
    ca_dir = tls.root / "coordinator" / "ca"
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    for name in ("ca.key", "server.key"):
        assert stat.S_IMODE((ca_dir / name).stat().st_mode) == 0o600


async def test_certificates_that_are_not_the_agents_current_one_are_refused(tls: Tls) -> None:
    key_pem, cert_pem = await tls.enroll("web-1")
    assert await connect_as(tls, key_pem, cert_pem) == grpc.StatusCode.OK
    assert tls.coordinator.ca is not None
    ca: InternalCA = tls.coordinator.ca
    ca_key = serialization.load_pem_private_key((ca.directory / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = datetime.now(UTC)
    own = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(own, ec.EllipticCurvePrivateKey)
    stranger = ec.generate_private_key(ec.SECP256R1())
    (tls.root / "foreign").mkdir()
    foreign_ca = InternalCA.open(tls.root / "foreign", now)
    _, foreign_csr = new_key_and_csr("web-1")
    subject = ca.certificate.subject
    attacks: dict[str, tuple[bytes | None, bytes | None]] = {
        "no client certificate": (None, None),
        "expired": (
            key_pem,
            certificate(ca_key, subject, own.public_key(), "web-1", now - 2 * DAY, now - DAY),
        ),
        "not yet valid": (
            key_pem,
            certificate(ca_key, subject, own.public_key(), "web-1", now + DAY, now + 2 * DAY),
        ),
        "self-signed": (
            pem_key(stranger),
            certificate(
                stranger,
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web-1")]),
                stranger.public_key(),
                "web-1",
                now - DAY,
                now + DAY,
            ),
        ),
        "issued by another CA": (
            pem_key(stranger),
            certificate(
                stranger, subject, stranger.public_key(), "web-1", now - DAY, now + DAY
            ),  # the right issuer name, the wrong key
        ),
        "web-1's certificate with another key": (pem_key(stranger), cert_pem),
        "a real CA-signed certificate never bound to web-1": (
            key_pem,
            certificate(ca_key, subject, own.public_key(), "web-1", now - DAY, now + DAY),
        ),
    }
    foreign = foreign_ca.sign_agent_csr(foreign_csr, "web-1", now)
    attacks["another coordinator's CA"] = (key_pem, foreign.pem)
    for name, (key, cert) in attacks.items():
        code = await refused_as(tls, key, cert)
        assert code in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED}, name
    assert not tls.coordinator.registry.connected("web-1")
    # The genuine agent is still served.
    assert await connect_as(tls, key_pem, cert_pem) == grpc.StatusCode.OK


DAY = timedelta(days=1)


async def test_removing_an_agent_revokes_its_certificate_and_cuts_its_stream(tls: Tls) -> None:
    key_pem, cert_pem = await tls.enroll("web-1")
    creds = grpc.ssl_channel_credentials(tls.ca_pem, key_pem, cert_pem)
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
        await tls.admin.remove_agent("web-1")
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await read_until_error(call)
        assert (cut.value.code(), cut.value.details()) == (
            grpc.StatusCode.UNAVAILABLE,
            "agent removed",
        )
    assert await refused_as(tls, key_pem, cert_pem) == grpc.StatusCode.UNAUTHENTICATED


async def test_re_enrollment_and_renewal_retire_the_previous_certificate(tls: Tls) -> None:
    first_key, first_cert = await tls.enroll("web-1")
    second_key, second_cert = await tls.enroll("web-1", await tls.join_token(replaces="web-1"))
    assert await refused_as(tls, first_key, first_cert) == grpc.StatusCode.UNAUTHENTICATED
    assert await connect_as(tls, second_key, second_cert) == grpc.StatusCode.OK

    new_key, csr = new_key_and_csr("web-1")
    creds = grpc.ssl_channel_credentials(tls.ca_pem, second_key, second_cert)
    async with grpc.aio.secure_channel(tls.agent_address, creds) as ch:
        renewed = await AgentsStub(ch).RenewCertificate(
            agents_pb2.RenewCertificateRequest(csr=csr), timeout=10
        )
    assert await connect_as(tls, new_key, bytes(renewed.certificate)) == grpc.StatusCode.OK
    assert await refused_as(tls, second_key, second_cert) == grpc.StatusCode.UNAUTHENTICATED
    # Renewal without a client certificate (the operator port) is refused.
    async with grpc.aio.secure_channel(tls.address, grpc.ssl_channel_credentials(tls.ca_pem)) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await AgentsStub(ch).RenewCertificate(
                agents_pb2.RenewCertificateRequest(csr=csr), timeout=10
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_agent_a_naming_agent_b_in_hello_is_cut_off_and_audited(tls: Tls) -> None:
    await tls.enroll("web-2")
    key_pem, cert_pem = await tls.enroll("web-1")
    code = await connect_as(tls, key_pem, cert_pem, name="web-2")
    assert code == grpc.StatusCode.PERMISSION_DENIED
    events = await tls.admin.list_audit(since=None)
    refused = [e for e in events if e.kind == "agent.impersonation_refused"]
    assert [(e.agent, e.details.get("claimed")) for e in refused] == [("web-1", "web-2")]


async def test_enrollment_needs_a_csr_a_valid_token_and_spends_it_once(tls: Tls) -> None:
    creds = grpc.ssl_channel_credentials(tls.ca_pem)
    token = await tls.join_token()
    _, csr = new_key_and_csr("web-1")
    async with grpc.aio.secure_channel(tls.address, creds) as ch:
        stub = AgentsStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as no_csr:
            await stub.Enroll(agents_pb2.EnrollRequest(join_token=token, name="web-1"))
        assert no_csr.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as garbage:
            await stub.Enroll(
                agents_pb2.EnrollRequest(join_token=token, name="web-1", csr=b"not a csr")
            )
        assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Twenty enrollments race for one token: exactly one wins.
        results = await asyncio.gather(
            *(
                stub.Enroll(
                    agents_pb2.EnrollRequest(join_token=token, name=f"race-{i}", csr=csr),
                    timeout=10,
                )
                for i in range(20)
            ),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, agents_pb2.EnrollResponse)]
        lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(won) == 1
        assert {e.code() for e in lost} == {grpc.StatusCode.UNAUTHENTICATED}
        assert all(token not in (e.details() or "") for e in lost)


async def test_operators_authenticate_with_client_certificates(
    tls: Tls, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.__main__ import main

    key_pem, csr = new_key_and_csr("alice")
    csr_file = tls.root / "alice.csr"
    csr_file.write_bytes(csr)
    data = str(tls.root / "coordinator")
    assert (
        main(["issue-operator-cert", "--data", data, "--user", "alice", "--csr", str(csr_file)])
        == 0
    )
    cert_pem = capsys.readouterr().out.encode()

    async def as_cert(key: bytes, cert: bytes) -> Client:
        return await Client.connect(
            tls.agent_address, credentials=grpc.ssl_channel_credentials(tls.ca_pem, key, cert)
        )

    async with await as_cert(key_pem, cert_pem) as alice:
        assert await alice.list_requests() == []
        # The certificate is alice: the admin-only token API refuses her.
        with pytest.raises(PermissionDeniedError):
            await alice.list_tokens()
        await tls.admin.set_user_disabled("alice")
        with pytest.raises(AuthenticationError):
            await alice.list_requests()
    # A certificate for a user the coordinator does not know, and an agent's certificate, name
    # no operator.
    unknown_key, unknown_csr = new_key_and_csr("mallory")
    assert tls.coordinator.ca is not None
    unknown = tls.coordinator.ca.sign_user_csr(unknown_csr, "mallory", datetime.now(UTC))
    agent_key, agent_cert = await tls.enroll("web-9")
    for key, cert in ((unknown_key, unknown.pem), (agent_key, agent_cert)):
        async with await as_cert(key, cert) as client:
            with pytest.raises(AuthenticationError):
                await client.list_requests()


async def test_reflection_lists_only_what_each_port_serves(tls: Tls) -> None:
    """Under TLS AgentLink is served on the agent port only; the operator port does not list it."""
    creds = grpc.ssl_channel_credentials(tls.ca_pem)
    async with grpc.aio.secure_channel(tls.address, creds) as ch:
        call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names: set[str] = set()
        async for answer in call:
            names.update(s.name for s in answer.list_services_response.service)
    assert "jitmesh.v1.Locks" in names
    assert "jitmesh.v1.Access" in names
    assert "jitmesh.v1.AgentLink" not in names
