"""Shapes of the names that cross the wire, shared by SDK, coordinator and agent.

Every value that can reach a file name, a hook's argv or a log line is checked against one of
these before it is used. Messages name the field, never echo the value.
"""

from __future__ import annotations

import re

SUBJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
ACTION = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
AGENT = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
LABEL_KEY = re.compile(r"[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?")
LABEL_VALUE = re.compile(r"[A-Za-z0-9._-]{0,63}")
ID = re.compile(r"[a-z]{1,8}-[0-9a-f]{32}")

# The prefix of each kind of id (server/domain/models.new_id): an id of one kind given where
# another is expected is named for what it is.
ID_PREFIXES = {"request": "req", "grant": "grt", "lock": "lck", "event": "evt"}
# Other prefixes an id of a kind may carry: a grant adopted from a break-glass code is
# "bg-<code id>" (docs/wire.md, "Break-glass codes").
ID_ALIASES = {"grant": ("bg",)}

MAX_REASON = 1024
MAX_LABELS = 32


class ValidationError(ValueError):
    """A value does not have the expected shape. The message names the field only."""


def check(pattern: re.Pattern[str], value: str, field: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValidationError(f"{field} is not valid (expected {_describe(pattern)})")
    return value


def check_id(value: str, kind: str) -> str:
    """An id of `kind` (request, grant, lock, event): its shape and its prefix."""
    prefix = ID_PREFIXES[kind]
    if not isinstance(value, str) or not ID.fullmatch(value):
        raise ValidationError(f"{kind} id is not valid (expected {prefix}-<32 hex digits>)")
    given = value.partition("-")[0]
    if given != prefix and given not in ID_ALIASES.get(kind, ()):
        other = next((k for k, p in ID_PREFIXES.items() if p == given), "")
        what = f"a {other} id ({given}-...)" if other else f"not a {kind} id"
        raise ValidationError(
            f"{kind} id is not valid: that is {what}; {kind} ids look like {prefix}-<32 hex digits>"
        )
    return value


def check_reason(value: str, *, field: str = "reason") -> str:
    if len(value) > MAX_REASON:
        raise ValidationError(f"{field} is longer than {MAX_REASON} characters")
    if any((ord(c) < 0x20 and c not in "\t") or ord(c) == 0x7F for c in value):
        raise ValidationError(f"{field} contains control characters")
    return value


def check_labels(labels: dict[str, str], *, field: str = "labels") -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise ValidationError(f"{field}: at most {MAX_LABELS} labels")
    for key, value in labels.items():
        check(LABEL_KEY, key, f"{field} key")
        check(LABEL_VALUE, value, f"{field} value")
    return dict(labels)


def _describe(pattern: re.Pattern[str]) -> str:
    return {
        SUBJECT.pattern: "letters, digits and ._@+- up to 128 characters",
        ACTION.pattern: "lower-case letters, digits and ._- up to 64 characters",
        AGENT.pattern: "lower-case letters, digits, . and - up to 63 characters",
        GROUP.pattern: "letters, digits and ._- up to 64 characters",
        RULE.pattern: "letters, digits and ._- up to 64 characters",
        LABEL_KEY.pattern: "lower-case letters, digits and ._/- up to 63 characters",
        LABEL_VALUE.pattern: "letters, digits and ._- up to 63 characters",
        ID.pattern: "an id such as grt-<32 hex digits>",
    }.get(pattern.pattern, "a valid value")
