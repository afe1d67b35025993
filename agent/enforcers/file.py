"""The `file` enforcer: one marker file per (subject, action) in a directory.

A marker named `{subject}:{action}` exists exactly while the pair is in force. Both names are
checked against the shared SUBJECT and ACTION shapes first, so neither can carry a path.

A removed marker is not deleted but renamed to its spare, `.{subject}:{action}.spare`, and the
pair's next apply writes the spare and renames it back. Creating a file allocates an inode, and
on ext4 that waits for the journal whenever another write is committing it (a SQLite commit, an
fsync anywhere on the disk): 55-200 us at the median and milliseconds at the tail measured
beside SQLite commits, against 15 us to rewrite a kept file (on the push path, before the ack).
At most MAX_SPARES are kept (the oldest is deleted); `observe` deletes spares this process did
not leave (an earlier run's).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections import OrderedDict
from datetime import datetime
from pathlib import Path

from agent.domain.coverage import Cover
from agent.domain.errors import EnforcerError
from agent.domain.leases import Pair
from jitmesh import validation
from jitmesh.clock import Clock, SystemClock

MAX_SPARES = 16
SPARE_SUFFIX = ".spare"


class FileEnforcer:
    def __init__(self, directory: Path, *, clock: Clock | None = None) -> None:
        self.directory = directory
        self._clock = clock or SystemClock()
        # The pairs whose spare this process left, oldest first.
        self._spares: OrderedDict[Pair, None] = OrderedDict()

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
        data = (line + "\n").encode()
        if cover.pair in self._spares:
            del self._spares[cover.pair]
            spare = self._spare(path)
            try:
                # Written beside the marker and renamed over it: readers see no marker or a
                # whole one.
                if _rewrite(spare, data):
                    os.replace(spare, path)
                    return
            except OSError:
                pass
            # Not usable: a new file, as without a spare, and the spare goes.
            with contextlib.suppress(OSError):
                spare.unlink()
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            try:
                _write_new(tmp, data)
            except FileNotFoundError:
                # The directory is made on first use only (not checked on every apply).
                self.directory.mkdir(parents=True, exist_ok=True)
                _write_new(tmp, data)
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
            # Kept as the pair's spare (see the module's docstring): gone as a marker all the
            # same, in one rename.
            os.replace(path, self._spare(path))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise EnforcerError(f"file enforcer: cannot remove marker ({exc.strerror})") from None
        self._spares[(subject, action)] = None
        self._spares.move_to_end((subject, action))
        while len(self._spares) > MAX_SPARES:
            oldest, _ = self._spares.popitem(last=False)
            with contextlib.suppress(OSError):
                self._spare(self.directory / f"{oldest[0]}:{oldest[1]}").unlink()

    async def observe(self) -> set[Pair]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise EnforcerError(f"file enforcer: cannot list markers ({exc.strerror})") from None
        found: set[Pair] = set()
        for name in names:
            if name.startswith(".") and name.endswith(SPARE_SUFFIX):
                self._drop_stray_spare(name)
                continue
            subject, sep, action = name.partition(":")
            # Temporary files and anything not shaped like a marker are not ours to judge.
            if (
                sep
                and validation.SUBJECT.fullmatch(subject)
                and validation.ACTION.fullmatch(action)
            ):
                found.add((subject, action))
        return found

    def _drop_stray_spare(self, name: str) -> None:
        """Delete a spare this process did not leave (an earlier run's): bounded by MAX_SPARES
        from the first reconcile on."""
        subject, _, action = name[1 : -len(SPARE_SUFFIX)].partition(":")
        if (subject, action) not in self._spares:
            with contextlib.suppress(OSError):
                (self.directory / name).unlink()

    @staticmethod
    def _spare(marker: Path) -> Path:
        return marker.with_name(f".{marker.name}{SPARE_SUFFIX}")

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


def _rewrite(path: Path, data: bytes) -> bool:
    """Replace the content of the kept file `path` by `data`, in place (no new inode); False if
    it is not a plain file of ours with one link (never written through). Raises OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
            return False
        if os.pwrite(fd, data, 0) != len(data):
            return False
        if st.st_size > len(data):
            # Shorter than before (only a time without microseconds is): cut the rest, within
            # the same block.
            os.ftruncate(fd, len(data))
        return True
    finally:
        os.close(fd)


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")
