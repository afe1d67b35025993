"""Ed25519 signature checks for the agent (PyNaCl, that is libsodium).

PyNaCl rather than `cryptography` (which the coordinator signs with): the same standard check,
in about 1 MiB of resident memory where `cryptography`'s bindings take about 7 MiB of the agent's
50 MiB budget, and faster per command (docs/performance.md). `cryptography` stays for the TLS
identity (key and CSR at enrollment and renewal), imported only there.
"""

from __future__ import annotations

import functools

from nacl.exceptions import CryptoError
from nacl.signing import VerifyKey


def signature_holds(public: bytes, signature: bytes, data: bytes) -> bool:
    """True only if `signature` is a valid Ed25519 signature of `data` by `public` (32 raw
    bytes); any malformed key or signature is simply not valid."""
    try:
        _key(public).verify(data, signature)
    except (CryptoError, TypeError):
        return False
    return True


@functools.lru_cache(maxsize=16)
def _key(public: bytes) -> VerifyKey:
    # A handful of pinned keys, checked on every command: parse each once.
    return VerifyKey(public)
