"""The web tests use the notification tests' real receivers (a webhook server)."""

from tests.notify.conftest import http, recorder

__all__ = ["http", "recorder"]
