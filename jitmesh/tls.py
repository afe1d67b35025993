"""How a client reaches the coordinator: TLS unless told otherwise (one rule for the SDK, jitctl
and the agent).

    explicit ca_file             TLS, trusting only that CA
    explicit insecure=True       plain text
    $JITMESH_CA_FILE             TLS, trusting only that CA
    $JITMESH_INSECURE=1          plain text
    nothing                      TLS, trusting the system's store (loaded explicitly: gRPC would
                                 otherwise fall back to its own bundled roots)

An explicit argument (or flag) beats the environment, so `insecure=False` stays TLS in a shell
that once sourced a dev coordinator's `dev.env`. Plain text to an address that is not loopback
logs a warning every time: the bearer token would cross the network readable by anyone on it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

from jitmesh import errors

__all__ = [
    "ENV_CA_FILE",
    "ENV_INSECURE",
    "Transport",
    "choose",
    "is_loopback",
    "parse_insecure",
    "system_roots",
]

ENV_CA_FILE: Final = "JITMESH_CA_FILE"
ENV_INSECURE: Final = "JITMESH_INSECURE"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})
# Where Debian, Fedora/RHEL, Alpine, and macOS keep the system bundle, should Python's own
# default paths name none that exists.
_KNOWN_BUNDLES: Final = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
)
_PEM_CERT: Final = b"-----BEGIN CERTIFICATE-----"

log = logging.getLogger("jitmesh")


@dataclass(frozen=True)
class Transport:
    """The chosen transport. `ca_file` None and `insecure` False: the system's trust store."""

    insecure: bool
    ca_file: Path | None = None

    @property
    def trust(self) -> str:
        """Which certificates the coordinator's must chain to, for error messages."""
        if self.insecure:
            return "plain text"
        return f"the CA in {self.ca_file}" if self.ca_file else "the system's trust store"

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS channel credentials (None for plain text); reads the CA file or the system store."""
        if self.insecure:
            return None
        pem = read_ca_file(self.ca_file) if self.ca_file else system_roots()
        return grpc.ssl_channel_credentials(pem)


def parse_insecure(text: str, *, source: str = ENV_INSECURE) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise errors.InvalidArgumentError(f"{source} must be 1 or 0 (true/false, yes/no, on/off)")


def choose(
    target: str,
    *,
    ca_file: str | os.PathLike[str] | None = None,
    insecure: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> Transport:
    """The transport for `target` by the rule in this module's docstring; warns (log) about
    plain text to an address that is not loopback."""
    env = os.environ if environ is None else environ
    if ca_file is not None and str(ca_file) and insecure:
        raise errors.InvalidArgumentError("give a CA file or insecure, not both")
    if ca_file is not None and str(ca_file):
        chosen = Transport(insecure=False, ca_file=Path(ca_file))
    elif insecure is not None:
        env_ca = env.get(ENV_CA_FILE, "")
        chosen = (
            Transport(insecure=True)
            if insecure
            else Transport(insecure=False, ca_file=Path(env_ca) if env_ca else None)
        )
    elif env.get(ENV_CA_FILE, ""):
        chosen = Transport(insecure=False, ca_file=Path(env[ENV_CA_FILE]))
    else:
        chosen = Transport(insecure=parse_insecure(env.get(ENV_INSECURE, "")))
    if chosen.insecure and not is_loopback(target):
        log.warning(
            "warning: plain text (insecure) to %s, which is not loopback: the token crosses the "
            "network readable by anyone on the path; unset %s or pass a CA file for TLS",
            target,
            ENV_INSECURE,
        )
    return chosen


def is_loopback(target: str) -> bool:
    """Whether a gRPC target ("host:port", "[v6]:port", "unix:...") stays on this machine."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    host, sep, port = host.rpartition(":")
    if not sep or not port.isdigit():
        host = target
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_ca_file(path: Path) -> bytes:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise errors.InvalidArgumentError(
            f"cannot read the CA file {path} (--ca-file / {ENV_CA_FILE}): "
            f"{exc.strerror or type(exc).__name__}"
        ) from None
    if _PEM_CERT not in pem:
        raise errors.InvalidArgumentError(
            f"the CA file {path} (--ca-file / {ENV_CA_FILE}) holds no PEM certificate"
        )
    return pem


def system_roots() -> bytes:
    """The system's trust store as PEM (Python's default paths, honouring SSL_CERT_FILE and
    SSL_CERT_DIR, then the usual bundle locations)."""
    paths = ssl.get_default_verify_paths()
    files = [paths.cafile, paths.openssl_cafile, *_KNOWN_BUNDLES]
    for name in files:
        if name and os.path.isfile(name):
            with open(name, "rb") as f:
                pem = f.read()
            if _PEM_CERT in pem:
                return pem
    for directory in (paths.capath, paths.openssl_capath):
        if directory and os.path.isdir(directory):
            chunks = []
            for entry in sorted(os.listdir(directory)):
                full = os.path.join(directory, entry)
                if os.path.isfile(full):
                    with open(full, "rb") as f:
                        data = f.read()
                    if _PEM_CERT in data:
                        chunks.append(data)
            if chunks:
                return b"\n".join(chunks)
    raise errors.InvalidArgumentError(
        f"found no system trust store: give the coordinator's CA with --ca-file or {ENV_CA_FILE}"
    )
