"""Structured operational logs: one `key=value` line per record, with fixed key names.

Modules log with `extra={...}` using the keys below; the entry point installs the formatter.
The audit log is separate: it lives on the coordinator, fed by acks and outbox events.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

# Fixed key names, in output order. Anything else in `extra` is not printed.
FIELDS = (
    "agent",
    "grant_id",
    "subject",
    "action",
    "seq",
    "status",
    "reason",
    "enforcer",
    "event_id",
    "count",
    "delay",
    "coordinator",
    "state_dir",
    "error",
)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        at = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        parts = [
            f"ts={at.replace('+00:00', 'Z')}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
        ]
        for key in FIELDS:
            value = record.__dict__.get(key)
            if value is not None and value != "":
                parts.append(f"{key}={_quote(str(value))}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class AgentField(logging.Filter):
    """Adds agent=NAME to every record."""

    def __init__(self, agent: str) -> None:
        super().__init__()
        self._agent = agent

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "agent", ""):
            record.agent = self._agent
        return True


def _quote(value: str) -> str:
    if value and all(c.isprintable() and c not in ' "=\\' for c in value):
        return value
    # JSON string quoting escapes quotes, backslashes and control characters (no log injection).
    return json.dumps(value, ensure_ascii=False)
