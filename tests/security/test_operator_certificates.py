"""Operator client certificates revoked one by one (`jitctl cert revoke SERIAL`): the revoked
certificate is refused on its very next call, over a channel that was already open (no cached
identity), while the same user's other certificates and tokens keep working."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from agent.identity import new_key_and_csr
from jitmesh import (
    AuthenticationError,
    Client,
    ConflictError,
    InvalidArgumentError,
    PermissionDeniedError,
)
from tests.security.test_enrollment import jitctl
from tests.security.test_mtls import Tls, serving_tls


@pytest.fixture
async def tls(tmp_path: Path) -> AsyncIterator[Tls]:
    async with serving_tls(tmp_path) as serving:
        yield serving


def issue(tls: Tls, user: str) -> tuple[bytes, bytes, int]:
    """Key, certificate and serial of a new operator certificate from the coordinator's CA."""
    assert tls.coordinator.ca is not None
    key_pem, csr = new_key_and_csr(user)
    issued = tls.coordinator.ca.sign_user_csr(csr, user, datetime.now(UTC))
    return key_pem, issued.pem, issued.serial


async def as_cert(tls: Tls, key: bytes, cert: bytes) -> Client:
    return await Client.connect(
        tls.agent_address, credentials=grpc.ssl_channel_credentials(tls.ca_pem, key, cert)
    )


async def test_a_revoked_operator_certificate_is_refused_on_its_next_call(tls: Tls) -> None:
    key_a, cert_a, serial_a = issue(tls, "alice")
    key_b, cert_b, _ = issue(tls, "alice")
    async with (
        await as_cert(tls, key_a, cert_a) as first,
        await as_cert(tls, key_b, cert_b) as second,
    ):
        assert await first.list_requests() == []
        # Alice cannot revoke (only admins can), not even her own certificate.
        with pytest.raises(PermissionDeniedError):
            await first.revoke_certificate(f"{serial_a:x}")
        # As `openssl x509 -serial` prints it: upper case; colons and 0x are accepted too.
        typed = f"{serial_a:X}"
        await jitctl(tls, "cert", "revoke", typed, "--reason", "laptop lost")
        with pytest.raises(AuthenticationError):
            await first.list_requests()
        # Her other certificate and her identity as such are untouched.
        assert await second.list_requests() == []
    async with await as_cert(tls, key_a, cert_a) as again:
        with pytest.raises(AuthenticationError):
            await again.list_requests()
    [event] = [e for e in await tls.admin.list_audit(since=None) if e.kind.endswith("revoked")]
    assert (event.kind, event.actor, event.details) == (
        "user.certificate_revoked",
        "admin",
        {"serial": f"{serial_a:x}", "reason": "laptop lost"},
    )
    with pytest.raises(ConflictError):
        await tls.admin.revoke_certificate(f"0x{serial_a:x}")
    spaced = ":".join(f"{serial_a:040x}"[i : i + 2] for i in range(0, 40, 2))
    with pytest.raises(ConflictError):
        await tls.admin.revoke_certificate(spaced)
    for bad in ("", "xyz", "1" * 41, "12;DROP TABLE users"):
        with pytest.raises(InvalidArgumentError) as refused:
            await tls.admin.revoke_certificate(bad)
        assert not bad or bad not in str(refused.value)


async def test_a_certificate_naming_a_variant_of_a_user_is_that_user(
    tls: Tls, capsys: pytest.CaptureFixture[str]
) -> None:
    """ "ALICE" in a certificate is alice: her groups, her disabled flag, one principal."""
    from server.__main__ import main

    key_pem, csr = new_key_and_csr("ALICE")
    csr_file = tls.root / "alice.csr"
    csr_file.write_bytes(csr)
    data = str(tls.root / "coordinator")
    argv = ["issue-operator-cert", "--data", data, "--user", "ALICE", "--csr", str(csr_file)]
    assert main(argv) == 0
    out = capsys.readouterr()
    cert = x509.load_pem_x509_certificate(out.out.encode())
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == ["jitmesh://user/alice"]
    assert f"serial={cert.serial_number:x}" in out.err
    # A certificate that names "ALICE" some other way (signed directly) is alice as well.
    wide_key, wide_cert, _ = issue(tls, "ALICE")
    for key, pem in ((key_pem, out.out.encode()), (wide_key, wide_cert)):
        async with await as_cert(tls, key, pem) as client:
            assert await client.list_requests() == []
            with pytest.raises(PermissionDeniedError):  # alice, not an admin, not unknown
                await client.list_tokens()
    await tls.admin.set_user_disabled("alice")
    async with await as_cert(tls, wide_key, wide_cert) as client:
        with pytest.raises(AuthenticationError):
            await client.list_requests()


@pytest.fixture
async def tls_developers_audit(tmp_path: Path) -> AsyncIterator[Tls]:
    # alice (developers) may tail the audit log only as an auditor (domain/reads.py).
    async with serving_tls(tmp_path, auditor_groups=("developers",)) as serving:
        yield serving


async def test_open_streams_end_when_their_credential_is_revoked_or_the_user_disabled(
    tls_developers_audit: Tls,
) -> None:
    """An authorization error ends a stream already open (Kubernetes CVE-2018-1002105)."""
    tls = tls_developers_audit
    await tls.enroll("db-1", await tls.join_token({"env": "prod"}))
    key, cert, serial = issue(tls, "alice")
    head = (await tls.admin.list_audit(since=None))[-1].seq
    async with (
        await as_cert(tls, key, cert) as alice,
        contextlib.aclosing(alice.tail_audit(after_seq=head)) as tail,
    ):
        await tls.admin.create_join_token()
        assert (await anext(tail)).kind == "agent.join_token_created"
        await tls.admin.revoke_certificate(f"{serial:x}")
        with pytest.raises(AuthenticationError):
            async with asyncio.timeout(10):
                await anext(tail)
    alice = await Client.connect(
        tls.address, token="jmt_test-alice", credentials=grpc.ssl_channel_credentials(tls.ca_pem)
    )
    async with alice:
        request, _ = await alice.create_request(
            agent="db-1", action="deploy", duration=timedelta(minutes=5), reason="INC-7"
        )
        async with contextlib.aclosing(alice.watch_requests([request.id])) as watch:
            async with asyncio.timeout(10):
                assert (await anext(watch)).id == request.id  # the current state comes first
            await tls.admin.set_user_disabled("alice")
            await tls.admin.cancel(request.id)
            with pytest.raises(AuthenticationError):
                async with asyncio.timeout(10):
                    await anext(watch)
