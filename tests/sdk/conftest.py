from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from jitmesh.client import Client
from tests.sdk.scripted import TOKEN, Scripted, serve


@pytest.fixture
def model() -> Scripted:
    return Scripted()


@pytest.fixture
async def target(model: Scripted) -> AsyncIterator[str]:
    async with serve(model) as address:
        yield address


@pytest.fixture
async def client(target: str) -> AsyncIterator[Client]:
    async with await Client.connect(target, token=TOKEN, timeout=5.0) as connected:
        yield connected
