"""The agent's mTLS identity: an ECDSA P-256 key made here (it never leaves the host), the
certificate the coordinator's CA issued for it, and the port where AgentLink wants it. Kept in the
state directory, in one file (`tls_identity.json`, 0600, written atomically)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from agent.store.credential import CredentialFile

# Renew once less than this fraction of the certificate's lifetime is left.
RENEW_FRACTION = 1 / 3


@dataclass(frozen=True, slots=True)
class TlsIdentity:
    key_pem: bytes
    cert_pem: bytes
    port: int

    def renew_at(self) -> datetime:
        # Imported here, as below: `cryptography` is 7 MiB of resident memory that an agent
        # without TLS never needs (docs/performance.md).
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(self.cert_pem)
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        return end - (end - start) * RENEW_FRACTION


def new_key_and_csr(name: str) -> tuple[bytes, bytes]:
    """A fresh private key (PEM) and a CSR for it. The CA writes the identity itself; the name
    here is informational."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


class IdentityFile:
    """One file, so a renewal replaces key and certificate together or not at all."""

    def __init__(self, path: Path) -> None:
        self._file = CredentialFile(path)

    def read(self) -> TlsIdentity | None:
        text = self._file.read()
        if text is None:
            return None
        try:
            item = json.loads(text)
            return TlsIdentity(item["key"].encode(), item["cert"].encode(), int(item["port"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def write(self, identity: TlsIdentity) -> None:
        self._file.write(
            json.dumps(
                {
                    "key": identity.key_pem.decode(),
                    "cert": identity.cert_pem.decode(),
                    "port": identity.port,
                }
            )
        )

    def delete(self) -> None:
        self._file.delete()
