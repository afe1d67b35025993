"""The coordinator's internal certificate authority (ECDSA P-256), in `DATA/ca/` (dir 0700, keys
0600).

It issues two kinds of certificates:

- the coordinator's own server certificate, for the names agents and operators dial
  (127.0.0.1, ::1, localhost and the configured host); reissued when it nears its end;
- agent client certificates, from a CSR sent at enrollment: the CA keeps only the CSR's public key
  (proof of possession checked) and writes the identity itself, `jitmesh://agent/NAME` as the URI
  SAN and NAME as the common name. Whatever the CSR asks for is ignored.

ECDSA P-256 only: Ed25519 certificates fail in gRPC's TLS.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.signing import write_private

CA_LIFETIME = timedelta(days=3650)
SERVER_LIFETIME = timedelta(days=365)
AGENT_LIFETIME = timedelta(days=30)
# Reissue (server) or rotate (agent) once less than this fraction of the lifetime is left.
RENEW_FRACTION = 1 / 3
BACKDATE = timedelta(minutes=5)
AGENT_URI = "jitmesh://agent/"
USER_URI = "jitmesh://user/"
USER_LIFETIME = timedelta(days=90)


class CertificateError(Exception):
    """A CSR or certificate that cannot be used; the message is safe to show."""


@dataclass(frozen=True, slots=True)
class Issued:
    pem: bytes
    serial: int
    not_after: datetime


@dataclass(frozen=True, slots=True)
class ServerTLS:
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes


class InternalCA:
    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.directory = directory
        self._key = key
        self._cert = cert

    @property
    def ca_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @classmethod
    def open(cls, data_dir: Path, now: datetime) -> InternalCA:
        directory = data_dir / "ca"
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        key_path, cert_path = directory / "ca.key", directory / "ca.pem"
        if key_path.exists() and cert_path.exists():
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise CertificateError("the CA key is not an ECDSA key")
            return cls(directory, loaded, x509.load_pem_x509_certificate(cert_path.read_bytes()))
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jitmesh internal CA")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        write_private(key_path, _key_pem(key))
        write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory, key, cert)

    def server_tls(self, hosts: list[str], now: datetime) -> ServerTLS:
        """The coordinator's server key and certificate, issued (again) when missing, near their
        end, or not covering `hosts`."""
        wildcard = {"", "0.0.0.0", "::"}  # noqa: S104 - listen addresses, never certificate names
        names = sorted({"127.0.0.1", "::1", "localhost", *hosts} - wildcard)
        key_path, cert_path = self.directory / "server.key", self.directory / "server.pem"
        if key_path.exists() and cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if set(names) <= set(_san_names(cert)) and not _renew_due(cert, now):
                return ServerTLS(key_path.read_bytes(), cert_path.read_bytes(), self.ca_pem)
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for host in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        cert = self._issue(
            key.public_key(),
            "jitmesh coordinator",
            sans,
            ExtendedKeyUsageOID.SERVER_AUTH,
            now,
            SERVER_LIFETIME,
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        write_private(key_path, _key_pem(key))
        write_private(cert_path, cert_pem)
        return ServerTLS(_key_pem(key), cert_pem, self.ca_pem)

    def sign_agent_csr(
        self, csr_pem: bytes, agent: str, now: datetime, lifetime: timedelta = AGENT_LIFETIME
    ) -> Issued:
        return self._sign_csr(csr_pem, AGENT_URI, agent, now, lifetime)

    def sign_user_csr(
        self, csr_pem: bytes, user: str, now: datetime, lifetime: timedelta = USER_LIFETIME
    ) -> Issued:
        """An operator client certificate (`jitmesh://user/NAME`): the user's groups and whether
        they are disabled are looked up on every call, as for a bearer token."""
        return self._sign_csr(csr_pem, USER_URI, user, now, lifetime)

    def _sign_csr(
        self, csr_pem: bytes, prefix: str, name: str, now: datetime, lifetime: timedelta
    ) -> Issued:
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise CertificateError("csr is not a PEM certificate signing request") from None
        if not csr.is_signature_valid:
            raise CertificateError("csr signature is not valid")
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
            raise CertificateError("csr key must be ECDSA P-256")
        cert = self._issue(
            public,
            name,
            [x509.UniformResourceIdentifier(prefix + name)],
            ExtendedKeyUsageOID.CLIENT_AUTH,
            now,
            lifetime,
        )
        return Issued(
            cert.public_bytes(serialization.Encoding.PEM),
            cert.serial_number,
            cert.not_valid_after_utc,
        )

    def _issue(
        self,
        public: ec.EllipticCurvePublicKey,
        common_name: str,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        now: datetime,
        lifetime: timedelta,
    ) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            # Backdated for clocks a little behind; never by more than a tenth of the lifetime,
            # so a short-lived certificate (tests) still renews at two thirds of its life.
            .not_valid_before(now - min(BACKDATE, lifetime / 10))
            .not_valid_after(min(now + lifetime, self._cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )


def agent_of(cert_pem: bytes) -> tuple[str, int]:
    """The agent name (from the `jitmesh://agent/NAME` URI SAN) and serial of a client
    certificate that TLS has already verified against this CA."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        raise CertificateError("client certificate names no agent") from None
    uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier)]
    names = [u.removeprefix(AGENT_URI) for u in uris if u.startswith(AGENT_URI)]
    if len(names) != 1:
        raise CertificateError("client certificate names no agent")
    return names[0], cert.serial_number


def user_of(cert_pem: bytes) -> tuple[str, int] | None:
    """The operator named by a verified client certificate's `jitmesh://user/NAME` URI SAN, and
    the certificate's serial; None for any other certificate (an agent's)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    names = [u.removeprefix(USER_URI) for u in uris if u.startswith(USER_URI)]
    return (names[0], cert.serial_number) if len(names) == 1 else None


def renew_due(cert_pem: bytes, now: datetime) -> bool:
    return _renew_due(x509.load_pem_x509_certificate(cert_pem), now)


def _renew_due(cert: x509.Certificate, now: datetime) -> bool:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now >= end - (end - start) * RENEW_FRACTION


def _san_names(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    ips = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    return [*ips, *sans.get_values_for_type(x509.DNSName)]


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
