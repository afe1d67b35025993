"""Fixtures for the sign-in tests: a real OpenID Connect provider and a coordinator that trusts
it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from jitmesh.clock import FakeClock
from server.app import Coordinator, build
from server.config import CoordinatorConfig
from server.domain.policy import DEV_POLICY
from tests.oidc.provider import CLIENT_ID, Provider

ACCOUNTS: dict[str, dict[str, Any]] = {
    "alice": {"email": "alice@corp.example", "groups": ["developers"]},
    "Bob": {"email": "bob@corp.example", "groups": ["sre", "Not A Group!"]},
    "carol": {"email": "carol@corp.example", "groups": ["sre"]},
}


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[Provider]:
    started = Provider(tmp_path / "idp", {k: dict(v) for k, v in ACCOUNTS.items()}).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime.now(UTC))


@pytest.fixture
async def coordinator(
    tmp_path: Path, provider: Provider, clock: FakeClock
) -> AsyncIterator[Coordinator]:
    config = CoordinatorConfig(
        data_dir=tmp_path / "coordinator", port=0, default_policy=DEV_POLICY,
        oidc_issuer=provider.issuer, oidc_client_id=CLIENT_ID,
    )  # fmt: skip
    built = await build(config, clock=clock)
    try:
        yield built
    finally:
        await built.stop()
