"""Coordinator configuration: parsed and validated once, at the edge, into a frozen model."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from server.domain.policy import EMPTY_POLICY


class CoordinatorConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = Field(default=7443, ge=0, le=65535)
    # Used only when the store holds no policy yet.
    initial_policy: Path | None = None
    default_policy: str = EMPTY_POLICY
    heartbeat: timedelta = timedelta(seconds=10)
    keepalive: timedelta = timedelta(seconds=30)
    keepalive_timeout: timedelta = timedelta(seconds=10)
    agent_queue_limit: int = Field(default=1000, ge=10)
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
