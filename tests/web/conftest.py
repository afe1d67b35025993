"""The web tests: a real chromium (tests/web/browsing.py), and the notification tests' real
receivers (a webhook server, an SMTP server with STARTTLS)."""

from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser

from tests.notify.conftest import http, recorder, smtp, tls_files
from tests.web.browsing import chromium

__all__ = ["browser", "http", "recorder", "smtp", "tls_files"]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as launched:
        yield launched
