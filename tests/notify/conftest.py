"""Fixtures for the notification tests: real HTTP and SMTP servers on loopback."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from server.ca import InternalCA
from tests.notify.servers import HttpRecorder, SmtpServer


@pytest.fixture
async def recorder() -> AsyncIterator[HttpRecorder]:
    server = HttpRecorder(asyncio.get_running_loop()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0) as client:
        yield client


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A server certificate for 127.0.0.1 from a CA made for the test: (cert, key, ca)."""
    now = datetime.now(UTC)
    tls = InternalCA.open(tmp_path, now).server_tls(["127.0.0.1"], now)
    cert, key, ca = tmp_path / "smtp.crt", tmp_path / "smtp.key", tmp_path / "ca.crt"
    cert.write_bytes(tls.cert_pem)
    key.write_bytes(tls.key_pem)
    ca.write_bytes(tls.ca_pem)
    return cert, key, ca


@pytest.fixture
async def smtp(tls_files: tuple[Path, Path, Path]) -> AsyncIterator[SmtpServer]:
    cert, key, _ = tls_files
    server = SmtpServer(asyncio.get_running_loop(), cert, key)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def smtp_tls(tls_files: tuple[Path, Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_files[2]))
