"""The overflow journal: lease ends and pending removals the lease table could not take.

On a full disk (or any failed write) during a revoke, the access is still taken away; without a
record of that end, a restart would find the lease active and apply it again until its
not_after. The journal is a small file allocated in full when the store opens
(`STATE/agent.journal`, `SIZE` bytes, blocks reserved with posix_fallocate and fsynced), then
only ever overwritten in place with pwrite + fdatasync: writing it needs no new disk blocks, so
it works on a disk with no free space left.

Layout: two slots of `SIZE / 2` bytes. Each write goes to the slot not holding the newest
version, with a sequence number one higher, a length and a CRC-32; a reader takes the valid slot
with the highest number. A write torn by a crash leaves the other slot (the previous version)
intact. Payload: JSON `{"ends": [...], "removals": [...]}`.

The SQLite store reads the journal at start and lays it over the table (journaled grants are
ended, never re-applied; `jitmesh-agent check` refuses them too), and moves it into the table and
clears it as soon as the table takes a write again. Its capacity (a slot of 128 KiB: about 1,000
revokes, or 350 expiries with their events) bounds what a full disk can hold back; past it the
write fails as before and the revoke is acked FAILED.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

JOURNAL_NAME = "agent.journal"
SIZE = 256 * 1024
_SLOT = SIZE // 2
_MAGIC = b"JMJ1"
_HEADER = struct.Struct(">4sQII")  # magic, sequence number, payload length, CRC-32 of payload


class JournalFull(Exception):
    pass


def read_entries(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The newest valid version in the journal at `path` (empty lists if none)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _empty()
    return _newest(data)[1]


class Journal:
    def __init__(self, fd: int, seq: int, entries: dict[str, list[dict[str, Any]]]) -> None:
        self._fd = fd
        self._seq = seq
        self.entries = entries

    @classmethod
    def open(cls, path: Path) -> Journal:
        """Open (creating and allocating it in full if needed) and read the journal."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size < SIZE:
                try:
                    os.posix_fallocate(fd, 0, SIZE)
                    os.fsync(fd)
                except OSError:
                    if size == 0:
                        # Not even allocated (a disk already full): leave no empty file behind.
                        path.unlink(missing_ok=True)
                    raise
            seq, entries = _newest(os.pread(fd, SIZE, 0))
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, seq, entries)

    @property
    def empty(self) -> bool:
        return not any(self.entries.values())

    def write(self, entries: dict[str, list[dict[str, Any]]]) -> None:
        """Replace the journal's content, durably. Raises JournalFull or OSError."""
        payload = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
        if _HEADER.size + len(payload) > _SLOT:
            raise JournalFull("the revoke journal is full")
        seq = self._seq + 1
        block = _HEADER.pack(_MAGIC, seq, len(payload), zlib.crc32(payload)) + payload
        # Slots alternate with the sequence number: the newest version stays intact.
        os.pwrite(self._fd, block, (seq % 2) * _SLOT)
        os.fdatasync(self._fd)
        self._seq = seq
        self.entries = entries

    def clear(self) -> None:
        self.write(_empty())

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def _empty() -> dict[str, list[dict[str, Any]]]:
    return {"ends": [], "removals": []}


def _newest(data: bytes) -> tuple[int, dict[str, list[dict[str, Any]]]]:
    best_seq, best = 0, _empty()
    for slot in (0, 1):
        block = data[slot * _SLOT : (slot + 1) * _SLOT]
        if len(block) < _HEADER.size:
            continue
        magic, seq, length, crc = _HEADER.unpack_from(block)
        payload = block[_HEADER.size : _HEADER.size + length]
        if magic != _MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
            continue
        try:
            parsed = json.loads(payload)
        except ValueError:
            continue
        if seq > best_seq and isinstance(parsed, dict):
            best_seq = seq
            best = {
                "ends": [e for e in parsed.get("ends", []) if isinstance(e, dict)],
                "removals": [r for r in parsed.get("removals", []) if isinstance(r, dict)],
            }
    return best_seq, best
