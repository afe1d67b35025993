"""The agent's core, as a few small parts under one coordinator object (`core.Engine`)."""

from agent.engine.core import Engine
from agent.engine.linkstate import HelloState

__all__ = ["Engine", "HelloState"]
