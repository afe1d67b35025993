"""The `file` enforcer: one marker file per (subject, action) in a directory.

A marker named `{subject}:{action}` exists exactly while the pair is in force. Both names are
checked against the shared SUBJECT and ACTION shapes first, so neither can carry a path.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from datetime import datetime
from pathlib import Path

from agent.domain.coverage import Cover
from agent.domain.errors import EnforcerError
from agent.domain.leases import Pair
from jitmesh import validation
from jitmesh.clock import Clock, SystemClock


class FileEnforcer:
    def __init__(self, directory: Path, *, clock: Clock | None = None) -> None:
        self.directory = directory
        self._clock = clock or SystemClock()

    @property
    def name(self) -> str:
        return "file"

    async def apply(self, cover: Cover) -> None:
        subject, action = cover.pair
        path = self._marker(subject, action)
        line = json.dumps(
            {"subject": subject, "action": action, "applied_at": _iso(self._clock.now())},
            sort_keys=True,
        )
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        data = (line + "\n").encode()
        try:
            try:
                _write_new(tmp, data)
            except FileNotFoundError:
                # The directory is made on first use only (not checked on every apply).
                self.directory.mkdir(parents=True, exist_ok=True)
                _write_new(tmp, data)
            # Written beside the marker and renamed over it: readers see no marker or a whole one.
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise EnforcerError(f"file enforcer: cannot write marker ({exc.strerror})") from None

    async def extend(self, cover: Cover) -> None:
        """A marker has no deadline of its own: nothing to move."""

    async def remove(self, subject: str, action: str) -> None:
        path = self._marker(subject, action)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise EnforcerError(f"file enforcer: cannot remove marker ({exc.strerror})") from None

    async def observe(self) -> set[Pair]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise EnforcerError(f"file enforcer: cannot list markers ({exc.strerror})") from None
        found: set[Pair] = set()
        for name in names:
            subject, sep, action = name.partition(":")
            # Temporary files and anything not shaped like a marker are not ours to judge.
            if (
                sep
                and validation.SUBJECT.fullmatch(subject)
                and validation.ACTION.fullmatch(action)
            ):
                found.add((subject, action))
        return found

    def _marker(self, subject: str, action: str) -> Path:
        try:
            validation.check(validation.SUBJECT, subject, "subject")
            validation.check(validation.ACTION, action, "action")
        except validation.ValidationError as exc:
            raise EnforcerError(f"file enforcer: {exc}") from None
        return self.directory / f"{subject}:{action}"


def _write_new(path: Path, data: bytes) -> None:
    # os-level calls: a marker is one short line, and a Python file object costs more than the
    # write itself on the push path.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")
