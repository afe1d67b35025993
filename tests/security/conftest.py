"""The coordinator fixtures of tests/server, reused: a real coordinator with users and agents."""

from tests.server.conftest import clock, coordinator, env

__all__ = ["clock", "coordinator", "env"]
