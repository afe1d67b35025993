"""The sign-in binding cookie (web/signin.py), as a pure function of key, value and time."""

from __future__ import annotations

import base64
import json

from web.signin import LIFETIME, Binding, seal, unseal

KEY = b"k" * 32
NOW = 1_800_000_000.0


def test_a_sealed_binding_comes_back_and_matches_only_its_state() -> None:
    binding = Binding.new(NOW)
    found = unseal(KEY, seal(KEY, binding), NOW + 1)
    assert found is not None
    assert (found.state, found.nonce) == (binding.state, binding.nonce)
    assert found.matches(binding.state)
    assert not found.matches("")
    assert not found.matches(binding.state + "x")
    assert Binding.new(NOW).state != binding.state


def test_altered_foreign_expired_and_malformed_cookies_are_refused() -> None:
    binding = Binding.new(NOW)
    value = seal(KEY, binding)
    payload, mac = value.split(".")
    forged = (
        base64.urlsafe_b64encode(
            json.dumps({"s": "attacker", "n": binding.nonce, "e": int(NOW + 60)}).encode()
        )
        .rstrip(b"=")
        .decode()
    )
    for bad in (
        f"{forged}.{mac}",  # another state under the old MAC
        seal(b"x" * 32, binding),  # another process's key
        value[:-2],
        payload,
        "",
        None,
        "a.b.c",
        "x" * 600,
    ):
        assert unseal(KEY, bad, NOW) is None, bad
    assert unseal(KEY, value, NOW + LIFETIME + 1) is None  # ten minutes are up
