"""Every agent default lives once (issue 10, item 14): the Engine, AgentConfig and the settings
behind flags, environment and TOML agree. `remove_retries` was 1 in the Engine and 6 in the CLI
and in AgentConfig."""

from __future__ import annotations

import dataclasses
import inspect

from agent import defaults
from agent.config import AgentConfig
from agent.engine import Engine
from agent.settings import SETTINGS

# Setting name -> AgentConfig field, where they differ.
CONFIG_FIELD = {"keepalive": "keepalive_time"}


def test_engine_config_and_settings_share_every_default() -> None:
    engine = inspect.signature(Engine.__init__).parameters
    config = {f.name: f.default for f in dataclasses.fields(AgentConfig)}
    settings = {s.name: s.default for s in SETTINGS}
    for name in ("remove_retries", "remove_retry_base"):
        assert engine[name].default == getattr(defaults, name.upper()), name
    for setting in (
        "backoff_base",
        "backoff_cap",
        "heartbeat",
        "keepalive",
        "keepalive_timeout",
        "remove_retries",
        "remove_retry_base",
        "skew_tolerance",
        "reconcile_every",
    ):
        expected = getattr(defaults, setting.upper())
        assert settings[setting] == expected, setting
        assert config[CONFIG_FIELD.get(setting, setting)] == expected, setting
