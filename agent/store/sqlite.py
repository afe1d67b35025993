"""The lease table in SQLite (`STATE/agent.db`): the only SQL of the agent besides `readonly`.

The stdlib `sqlite3` module is called synchronously inside the async methods, on purpose: there is
one writer, every transaction takes well under a millisecond (WAL, synchronous=NORMAL), and the
push-latency budget allows at most one thread hand-off per command; running the calls inline costs
less than any hand-off to a worker thread would.

WAL checkpoints are the exception: they copy the WAL back into the database and sync both (a few
milliseconds, more on a busy disk), so they never run inside a command's commit (SQLite's
automatic checkpoint did, in the commit that crossed its mark of 1,000 pages: the push's p99).
`run_checkpoints` runs them on a worker thread with a connection of their own, beside the commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from agent.domain.breakglass import KeptLock, LockChange, Use
from agent.domain.errors import DiskFull, StateError, StateUnreadable
from agent.domain.leases import Lease, LeaseState, OutboxEvent, Pair
from agent.domain.removals import Removal
from jitmesh.clock import from_ms, to_ms
from jitmesh.pidlock import DirectoryBusy, lock_directory
from jitmesh.types import OfflineMode, OfflinePolicy

from .base import Meta
from .journal import JOURNAL_NAME, Journal, JournalFull
from .migrate import migrate, migrate_isolated
from .readonly import DB_NAME
from .space import disk_full, is_corrupt_error, is_full_error

log = logging.getLogger(__name__)

LOCK_NAME = "agent.lock"

_LEASE_COLUMNS = (
    "grant_id, subject, action, request_id, not_before_ms, not_after_ms, offline_mode, "
    "offline_grace_ms, state, seq, applied_at_ms, removed_at_ms, remove_reason"
)
_EVENT_COLUMNS = "event_id, kind, grant_id, subject, action, observed_at_ms, details, counter"

# Commits between two WAL checkpoints. A command's commit adds 3-4 pages to the WAL, so this is
# about the 1,000 pages at which SQLite's own automatic checkpoint ran.
CHECKPOINT_EVERY = 256
# A checkpoint beside the commits copies only what the WAL held when it began, and SQLite starts
# the WAL over only at a write that finds all of it copied: under commands that never pause, the
# WAL would grow without end (the coordinator's did: `server/store/sqlite.py`). Past this many
# frames (pages), the checkpoint runs once more on the writer's own connection, between two
# transactions, where no commit adds frames meanwhile: the next commit starts the WAL over. A
# command then waits for it (once per 16 MiB of WAL, and only when the agent never paused).
WAL_MAX_FRAMES = 4096
# Checkpoint passes on the worker thread, at most, before the one inline (`checkpoint`).
CHECKPOINT_PASSES = 3
# The WAL's file is cut down to this size when it starts over (else it keeps its largest size).
WAL_SIZE_LIMIT = 4 * 1024 * 1024


class SqliteLeaseStore:
    """Writes that fail (a full disk) for a lease's end or a pending removal go to the overflow
    journal (`journal.py`) instead, and reads lay the journal over the table until it is moved
    in: a lease ended in the journal is never active again."""

    def __init__(
        self,
        db: sqlite3.Connection,
        lock_fd: int,
        journal: Journal | None,
        state_dir: Path | None = None,
        *,
        checkpoint_every: int = CHECKPOINT_EVERY,
        wal_max_frames: int = WAL_MAX_FRAMES,
    ) -> None:
        # Where the table lives: a failed write asks its disk whether it is full.
        self._state_dir = state_dir
        self._db = db
        self._lock_fd = lock_fd
        self._journal = journal
        self._flushing = False
        # WAL checkpoints (`run_checkpoints`): commits since the last one, set once there are
        # `checkpoint_every`; the worker thread and its connection, made at the first one.
        self._checkpoint_every = checkpoint_every
        self._wal_max_frames = wal_max_frames
        self._commits = 0
        self._uncheckpointed = 0
        self._checkpoint_due = asyncio.Event()
        self._worker: ThreadPoolExecutor | None = None
        self._beside: sqlite3.Connection | None = None

    @classmethod
    def open(
        cls,
        state_dir: Path,
        *,
        migrations: Callable[[Path], int] = migrate,
        checkpoint_every: int = CHECKPOINT_EVERY,
        wal_max_frames: int = WAL_MAX_FRAMES,
    ) -> SqliteLeaseStore:
        """Lock the state directory for this process, migrate the schema (in this process:
        tests and tools; the agent uses `open_or_recover`), open the table."""
        lock_fd = _lock(state_dir / LOCK_NAME)
        try:
            try:
                migrations(state_dir / DB_NAME)
            except (sqlite3.Error, OSError) as exc:
                raise _open_error(exc, state_dir) from exc
            return cls._attach(
                state_dir,
                lock_fd,
                checkpoint_every=checkpoint_every,
                wal_max_frames=wal_max_frames,
            )
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _attach(
        cls,
        state_dir: Path,
        lock_fd: int,
        *,
        checkpoint_every: int = CHECKPOINT_EVERY,
        wal_max_frames: int = WAL_MAX_FRAMES,
    ) -> SqliteLeaseStore:
        """Open the migrated table in the locked directory (the lock then belongs to the
        store); raises StateError (DiskFull, StateUnreadable) and leaves the lock to the
        caller."""
        db_path = state_dir / DB_NAME
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=True)
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit is in the WAL (the OS cache) before the ack leaves,
            # so a crash or SIGKILL loses nothing acked (tests/e2e/test_agent_kill.py); no fsync
            # per commit (FULL costs one per command). A power cut can lose the newest commits,
            # never corrupt the file: the Hello then says where the table stopped and the
            # coordinator resends from there (docs/performance.md, "Durability").
            db.execute("PRAGMA synchronous=NORMAL")
            # Never a checkpoint inside a commit: `run_checkpoints` runs them beside the commits.
            db.execute("PRAGMA wal_autocheckpoint=0")
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            db.execute("PRAGMA busy_timeout=5000")
            # At most 512 KiB of page cache (SQLite's default is 2 MiB): the hot pages (active
            # leases, meta) are few, the rest is history, and the agent's memory budget is small.
            db.execute("PRAGMA cache_size=-512")
            # A damaged file is found now, at start, not in the middle of a command.
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise StateUnreadable("cannot open the lease table: quick_check failed")
            db.execute("SELECT count(*) FROM leases").fetchone()
        except BaseException as exc:
            if db is not None:
                db.close()
            if isinstance(exc, sqlite3.Error | OSError | ValueError):
                raise _open_error(exc, state_dir) from exc
            raise
        journal_path = state_dir / JOURNAL_NAME
        try:
            journal: Journal | None = Journal.open(journal_path)
        except OSError as exc:
            if journal_path.exists():
                # It may hold ends the table lacks: starting without them could re-apply access.
                db.close()
                raise StateError(f"cannot read the revoke journal ({exc.strerror})") from None
            log.warning("no revoke journal (cannot allocate it)", extra={"error": exc.strerror})
            journal = None
        store = cls(
            db,
            lock_fd,
            journal,
            state_dir,
            checkpoint_every=checkpoint_every,
            wal_max_frames=wal_max_frames,
        )
        store._flush_journal()
        return store

    def close(self) -> None:
        """Idempotent: the lock's file descriptor is closed once, never a reused number."""
        if self._lock_fd < 0:
            return
        if self._worker is not None:
            # A checkpoint still running on its thread ends first (a few milliseconds).
            self._worker.shutdown(wait=True)
        if self._beside is not None:
            self._beside.close()
        self._db.close()
        if self._journal is not None:
            self._journal.close()
        os.close(self._lock_fd)
        self._lock_fd = -1

    @classmethod
    async def open_or_recover(
        cls,
        state_dir: Path,
        *,
        now_ms: int,
        migrations: Callable[[Path], Awaitable[int]] = migrate_isolated,
    ) -> tuple[SqliteLeaseStore, str]:
        """Lock the state directory, migrate (in a child process: cancelling this kills it),
        open the lease table. If the table cannot be read (corrupt, truncated, not a
        database), move it aside (`agent.db.corrupt-<ms>`, with its WAL and shared-memory
        files) and start with an empty one. Returns the store and, if a table was moved aside,
        why ("" otherwise). A full disk is never taken for a damaged table: DiskFull is raised
        and nothing is moved.

        The caller must then treat every access on the host as unmanaged (an empty table: the
        start-up reconcile removes all the enforcers observe) and resync from the coordinator.
        """
        lock_fd = _lock(state_dir / LOCK_NAME)
        try:
            try:
                return await cls._migrate_and_attach(state_dir, lock_fd, migrations), ""
            except StateUnreadable as exc:
                why = str(exc)
            db_path = state_dir / DB_NAME
            for suffix in ("", "-wal", "-shm"):
                part = db_path.with_name(db_path.name + suffix)
                if part.exists():
                    os.replace(part, part.with_name(f"{part.name}.corrupt-{now_ms}"))
            return await cls._migrate_and_attach(state_dir, lock_fd, migrations), why
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    async def _migrate_and_attach(
        cls, state_dir: Path, lock_fd: int, migrations: Callable[[Path], Awaitable[int]]
    ) -> SqliteLeaseStore:
        try:
            await migrations(state_dir / DB_NAME)
        except (sqlite3.Error, OSError) as exc:
            raise _open_error(exc, state_dir) from exc
        except StateError as exc:
            # A failure the child could not name (yoyo hides a full disk behind its lock).
            full = disk_full(state_dir)
            if full and not isinstance(exc, DiskFull):
                raise DiskFull(full) from exc
            raise
        return cls._attach(state_dir, lock_fd)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One immediate transaction. SQLite errors (a full disk, I/O errors) surface as
        StateError, so callers can answer a failed ack instead of crashing the agent."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._failed("lease table unavailable", exc) from exc
        try:
            yield self._db
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise self._failed("lease table write failed", exc) from exc
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise self._failed("lease table commit failed", exc) from exc
        self._commits += 1
        self._uncheckpointed += 1
        if self._uncheckpointed >= self._checkpoint_every:
            self._checkpoint_due.set()
        # The table takes writes again: move what the journal holds into it.
        self._flush_journal()

    def _failed(self, what: str, exc: sqlite3.Error) -> StateError:
        """A failed write, named: DiskFull when the disk is (whatever SQLite called it)."""
        full = disk_full(self._state_dir) if self._state_dir is not None else None
        if full or is_full_error(exc):
            return DiskFull(f"{what}: {full or 'the disk is full'}")
        return StateError(f"{what}: {exc}" if str(exc) else f"{what}: {type(exc).__name__}")

    # WAL checkpoints.

    async def run_checkpoints(self) -> None:
        """Until cancelled: a WAL checkpoint after every `checkpoint_every` commits, beside the
        commits (`checkpoint`). Without it the WAL only grows (the store never checkpoints in a
        commit); closing the store checkpoints what is left."""
        due = self._checkpoint_due
        while True:
            await due.wait()
            due.clear()
            try:
                await self.checkpoint()
            except (sqlite3.Error, OSError, RuntimeError) as exc:
                # Never the agent's end: nothing is lost, the WAL only grows until the next
                # one (RuntimeError: no thread could be started).
                log.warning("WAL checkpoint failed", extra={"error": str(exc)})

    async def checkpoint(self) -> tuple[bool, int]:
        """Copy the WAL back into the database: PASSIVE, on the worker thread with its own
        connection, so commits go on meanwhile (a checkpoint never waits for the writer, nor the
        writer for it; the GIL is released while SQLite works). Returns whether all of the WAL
        was copied (the next commit then starts it over) and how many frames it holds.

        A pass copies what the WAL held when it began: a commit made meanwhile leaves frames
        behind it, and the WAL is not started over. Then another pass copies that tail (a few
        frames: short, so no commit usually falls into it), up to CHECKPOINT_PASSES in all; if
        commits fell into each of them and the WAL holds more than `wal_max_frames`, a last
        pass runs on the writer's own connection, inline (see WAL_MAX_FRAMES)."""
        self._uncheckpointed = 0
        if self._state_dir is None:
            return _checkpoint(self._db)
        if self._worker is None:
            try:
                # Opened here, not on the worker: its memory then comes from the main thread's
                # allocator arena, not a new one (agent RSS budget).
                self._beside = sqlite3.connect(
                    self._state_dir / DB_NAME, isolation_level=None, check_same_thread=False
                )
            except sqlite3.Error as exc:
                log.warning("WAL checkpoint failed", extra={"error": str(exc)})
                return False, 0
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="agent-wal")
        loop = asyncio.get_running_loop()
        for _ in range(CHECKPOINT_PASSES):
            commits = self._commits
            done_all, frames = await loop.run_in_executor(self._worker, self._checkpoint_beside)
            if self._commits == commits:
                # Nothing committed during the pass: what it says is still true.
                return done_all, frames
        if frames > self._wal_max_frames:
            return _checkpoint(self._db)
        return False, frames

    def _checkpoint_beside(self) -> tuple[bool, int]:
        """On the worker thread (one at a time: the worker has one thread)."""
        assert self._beside is not None
        return _checkpoint(self._beside)

    # The overflow journal.

    def _journaled(self) -> dict[str, list[dict[str, Any]]]:
        if self._journal is None:
            return {"ends": [], "removals": []}
        return self._journal.entries

    def _journal_add(self, kind: str, entry: dict[str, Any], key: Iterable[str]) -> None:
        """Add (or replace, by the fields `key`) one entry; raises StateError if impossible."""
        if self._journal is None:
            raise StateError("lease table write failed and no revoke journal")
        fields = tuple(key)
        entries = {name: list(items) for name, items in self._journal.entries.items()}
        entries[kind] = [
            e
            for e in entries[kind]
            if tuple(e.get(f) for f in fields) != tuple(entry[f] for f in fields)
        ] + [entry]
        try:
            self._journal.write(entries)
        except (JournalFull, OSError) as exc:
            raise StateError(f"revoke journal write failed: {exc}") from None

    def _flush_journal(self) -> None:
        """Move the journal's entries into the table (one transaction), then clear it. Replaying
        them twice is harmless: ends are compare-and-set on active, events written once per id."""
        journal = self._journal
        if journal is None or journal.empty or self._flushing:
            return
        self._flushing = True
        try:
            with self._tx() as db:
                for end in journal.entries["ends"]:
                    changed = db.execute(
                        "UPDATE leases SET state = ?, removed_at_ms = ?, remove_reason = ? "
                        "WHERE grant_id = ? AND state = 'active'",
                        (end["state"], end["removed_at_ms"], end["reason"], end["grant_id"]),
                    ).rowcount
                    if changed and end.get("event"):
                        _insert_event(db, _event_from_json(end["event"]))
                for row in journal.entries["removals"]:
                    # A row the table took meanwhile (more attempts) is newer: keep it.
                    _upsert_removal(db, _removal_from_json(row), only_if_newer=True)
            journal.clear()
            log.info("revoke journal moved into the lease table")
        except (StateError, JournalFull, OSError, KeyError, TypeError, ValueError) as exc:
            log.warning(
                "revoke journal kept: the lease table is still not writable",
                extra={"error": str(exc)},
            )
        finally:
            self._flushing = False

    def _journal_ends(self) -> dict[str, dict[str, Any]]:
        return {e["grant_id"]: e for e in self._journaled()["ends"]}

    def _overlay(self, lease: Lease) -> Lease:
        end = self._journal_ends().get(lease.grant_id)
        if end is None or lease.state is not LeaseState.ACTIVE:
            return lease
        return lease.ended(
            at=from_ms(end["removed_at_ms"]), reason=end["reason"], state=LeaseState(end["state"])
        )

    # Metadata.

    async def meta(self) -> Meta:
        values = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        last_wall = values.get("last_wall_ms")
        last_contact = values.get("last_contact_ms")
        return Meta(
            agent=values.get("agent", ""),
            last_applied_seq=int(values.get("last_applied_seq", "0")),
            epoch=int(values.get("epoch", "0")),
            boot_id=values.get("boot_id", ""),
            last_wall_at=from_ms(int(last_wall)) if last_wall else None,
            last_contact_at=from_ms(int(last_contact)) if last_contact else None,
            snapshot_seq=int(values.get("snapshot_seq", "0")),
        )

    async def claim(self, agent: str, boot_id: str) -> None:
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'agent'").fetchone()
            if row is not None and row[0] != agent:
                # The table's leases, sequence numbers and tombstones belong to one agent.
                raise StateError("the state directory belongs to an agent with another name")
            _put(db, "agent", agent)
            _put(db, "boot_id", boot_id)

    async def note_epoch(self, epoch: int) -> None:
        with self._tx() as db:
            _raise_epoch(db, epoch)

    async def note_wall(self, at: datetime) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('last_wall_ms', :v) ON CONFLICT (key) "
                "DO UPDATE SET value = max(CAST(value AS INTEGER), :v)",
                {"v": to_ms(at)},
            )

    async def note_contact(self, at: datetime) -> None:
        with self._tx() as db:
            _put(db, "last_contact_ms", str(to_ms(at)))

    # Leases.

    async def lease(self, grant_id: str) -> Lease | None:
        row = self._db.execute(
            f"SELECT {_LEASE_COLUMNS} FROM leases WHERE grant_id = ?", (grant_id,)
        ).fetchone()
        return self._overlay(_lease(row)) if row else None

    async def leases(self, grant_ids: Iterable[str]) -> dict[str, Lease]:
        found: dict[str, Lease] = {}
        for grant_id in set(grant_ids):
            lease = await self.lease(grant_id)
            if lease is not None:
                found[grant_id] = lease
        return found

    async def active_leases(self) -> list[Lease]:
        rows = self._db.execute(
            f"SELECT {_LEASE_COLUMNS} FROM leases WHERE state = 'active' ORDER BY not_after_ms"
        ).fetchall()
        ended = self._journal_ends()
        return [_lease(row) for row in rows if row[0] not in ended]

    async def active_leases_of(self, pairs: Iterable[Pair]) -> list[Lease]:
        # One indexed look-up per pair (`leases_active`), not a scan of every active lease: a
        # host holding many grants pays per command for the pairs the command touches only.
        rows: list[Any] = []
        for subject, action in sorted(set(pairs)):
            rows += self._db.execute(
                f"SELECT {_LEASE_COLUMNS} FROM leases "
                "WHERE state = 'active' AND subject = ? AND action = ?",
                (subject, action),
            ).fetchall()
        rows.sort(key=lambda row: row[5])  # not_after_ms, as active_leases orders them
        ended = self._journal_ends()
        return [_lease(row) for row in rows if row[0] not in ended]

    async def record_command(
        self,
        *,
        seq: int,
        epoch: int,
        writes: Sequence[Lease],
        snapshot: bool = False,
        locks: LockChange | None = None,
    ) -> None:
        with self._tx() as db:
            if locks is not None:
                _change_locks(db, locks)
            for lease in writes:
                db.execute(
                    f"INSERT INTO leases ({_LEASE_COLUMNS}) VALUES "
                    "(:grant_id, :subject, :action, :request_id, :not_before_ms, :not_after_ms, "
                    ":offline_mode, :offline_grace_ms, :state, :seq, :applied_at_ms, "
                    ":removed_at_ms, :remove_reason) "
                    "ON CONFLICT (grant_id) DO UPDATE SET subject = excluded.subject, "
                    "action = excluded.action, request_id = excluded.request_id, "
                    "not_before_ms = excluded.not_before_ms, not_after_ms = excluded.not_after_ms, "
                    "offline_mode = excluded.offline_mode, "
                    "offline_grace_ms = excluded.offline_grace_ms, state = excluded.state, "
                    "seq = excluded.seq, applied_at_ms = excluded.applied_at_ms, "
                    "removed_at_ms = excluded.removed_at_ms, "
                    "remove_reason = excluded.remove_reason",
                    _lease_row(lease),
                )
            # One statement for both: the sequence number as given, the epoch only upwards.
            db.execute(
                "INSERT INTO meta (key, value) "
                "VALUES ('last_applied_seq', :seq), ('epoch', :epoch) "
                "ON CONFLICT (key) DO UPDATE SET value = CASE key WHEN 'epoch' "
                "THEN max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER)) "
                "ELSE excluded.value END",
                {"seq": str(seq), "epoch": epoch},
            )
            if snapshot:
                # A key of the meta table: no migration, and a previous release ignores it.
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('snapshot_seq', :seq) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    {"seq": str(seq)},
                )

    async def mark_applied(
        self, grant_id: str, at: datetime, event: OutboxEvent | None = None
    ) -> bool:
        with self._tx() as db:
            # Compare-and-set: only an active lease can become applied.
            changed = db.execute(
                "UPDATE leases SET applied_at_ms = ? WHERE grant_id = ? AND state = 'active'",
                (to_ms(at), grant_id),
            ).rowcount
            if changed and event is not None:
                _insert_event(db, event)
        return bool(changed)

    async def mark_failed(
        self, grant_id: str, at: datetime, reason: str, event: OutboxEvent | None = None
    ) -> bool:
        with self._tx() as db:
            changed = db.execute(
                "UPDATE leases SET state = 'failed', removed_at_ms = ?, remove_reason = ? "
                "WHERE grant_id = ? AND state = 'active'",
                (to_ms(at), reason, grant_id),
            ).rowcount
            if changed and event is not None:
                _insert_event(db, event)
        return bool(changed)

    async def end_lease(self, lease: Lease, event: OutboxEvent | None = None) -> bool:
        """If the table cannot be written, the end (and its event) goes to the journal: from
        then on the lease reads as ended, here and in `check`, across restarts."""
        if lease.state is LeaseState.ACTIVE or lease.removed_at is None:
            raise ValueError("end_lease needs an ended lease")
        try:
            with self._tx() as db:
                changed = db.execute(
                    "UPDATE leases SET state = ?, removed_at_ms = ?, remove_reason = ? "
                    "WHERE grant_id = ? AND state = 'active'",
                    (
                        lease.state.value,
                        to_ms(lease.removed_at),
                        lease.remove_reason,
                        lease.grant_id,
                    ),
                ).rowcount
                if changed and event is not None:
                    _insert_event(db, event)
        except StateError as exc:
            current = await self.lease(lease.grant_id)
            if current is None or current.state is not LeaseState.ACTIVE:
                return False
            self._journal_add(
                "ends",
                {
                    "grant_id": lease.grant_id,
                    "state": lease.state.value,
                    "removed_at_ms": to_ms(lease.removed_at),
                    "reason": lease.remove_reason,
                    "event": None if event is None else _event_json(event),
                },
                ("grant_id",),
            )
            log.error(
                "lease end kept in the revoke journal",
                extra={"grant_id": lease.grant_id, "error": str(exc)},
            )
            return True
        return bool(changed)

    # Locks kept from the coordinator, and break-glass uses.

    async def locks(self) -> list[KeptLock]:
        rows = self._db.execute(
            "SELECT lock_id, subject, action, expires_at_ms, reason FROM locks ORDER BY lock_id"
        ).fetchall()
        return [
            KeptLock(
                lock_id=row[0],
                subject=row[1],
                action=row[2],
                expires_at=None if row[3] is None else from_ms(row[3]),
                reason=row[4],
            )
            for row in rows
        ]

    async def record_breakglass(self, lease: Lease, use: Use, event: OutboxEvent) -> bool:
        with self._tx() as db:
            taken = db.execute(
                "INSERT INTO breakglass (code_id, grant_id, code, subject, action, caller, "
                "used_at_ms, not_after_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (code_id) DO NOTHING",
                (
                    use.code_id,
                    use.grant_id,
                    use.code,
                    use.subject,
                    use.action,
                    use.caller,
                    to_ms(use.used_at),
                    to_ms(use.not_after),
                ),
            ).rowcount
            if not taken:
                return False
            db.execute(
                f"INSERT INTO leases ({_LEASE_COLUMNS}) VALUES "
                "(:grant_id, :subject, :action, :request_id, :not_before_ms, :not_after_ms, "
                ":offline_mode, :offline_grace_ms, :state, :seq, :applied_at_ms, "
                ":removed_at_ms, :remove_reason)",
                _lease_row(lease),
            )
            _insert_event(db, event)
        return True

    async def breakglass_used(self, code_id: str) -> bool:
        row = self._db.execute("SELECT 1 FROM breakglass WHERE code_id = ?", (code_id,)).fetchone()
        return row is not None

    async def breakglass_unadopted(self) -> list[Use]:
        rows = self._db.execute(
            "SELECT code_id, grant_id, code, subject, action, caller, used_at_ms, not_after_ms "
            "FROM breakglass WHERE adopted = 0 ORDER BY used_at_ms"
        ).fetchall()
        return [
            Use(
                code_id=row[0],
                grant_id=row[1],
                code=bytes(row[2]),
                subject=row[3],
                action=row[4],
                caller=row[5],
                used_at=from_ms(row[6]),
                not_after=from_ms(row[7]),
            )
            for row in rows
        ]

    async def breakglass_adopted(self, code_ids: Iterable[str]) -> None:
        with self._tx() as db:
            db.executemany(
                "UPDATE breakglass SET adopted = 1 WHERE code_id = ?", [(c,) for c in code_ids]
            )

    # Pending removals.

    async def ended_leases(self, *, after: str = "", limit: int = 500) -> list[Lease]:
        # A lease ended only in the journal is still active in the table: not listed (it is
        # not deletable until the journal is moved in).
        rows = self._db.execute(
            f"SELECT {_LEASE_COLUMNS} FROM leases WHERE state != 'active' AND grant_id > ? "
            "ORDER BY grant_id LIMIT ?",
            (after, limit),
        ).fetchall()
        return [_lease(row) for row in rows]

    async def delete_ended(self, grant_ids: Iterable[str]) -> int:
        ids = sorted(set(grant_ids))
        if not ids:
            return 0
        with self._tx() as db:
            return sum(
                db.execute(
                    "DELETE FROM leases WHERE grant_id = ? AND state != 'active'", (gid,)
                ).rowcount
                for gid in ids
            )

    async def removals(self) -> list[Removal]:
        rows = self._db.execute(
            "SELECT subject, action, grant_ids, attempts, next_at_ms, since_ms, error, reported "
            "FROM removals ORDER BY subject, action"
        ).fetchall()
        found = {
            (row[0], row[1]): Removal(
                pair=(row[0], row[1]),
                grant_ids=tuple(json.loads(row[2])),
                attempts=row[3],
                next_at=from_ms(row[4]),
                since=from_ms(row[5]),
                error=row[6],
                reported=bool(row[7]),
            )
            for row in rows
        }
        for entry in self._journaled()["removals"]:
            removal = _removal_from_json(entry)
            found[removal.pair] = removal
        return [found[pair] for pair in sorted(found)]

    async def save_removal(self, removal: Removal, events: Sequence[OutboxEvent] = ()) -> None:
        """Insert or replace the pending removal of `removal.pair` (and write `event`); on a
        failed write it goes to the journal (its events are then lost: the coordinator
        already has the revoke's FAILED ack)."""
        try:
            with self._tx() as db:
                _upsert_removal(db, removal)
                for event in events:
                    _insert_event(db, event)
        except StateError:
            self._journal_add(
                "removals",
                _removal_json(removal),
                ("subject", "action"),
            )

    async def drop_removal(self, pair: Pair, events: Sequence[OutboxEvent] = ()) -> None:
        """The removal of `pair` succeeded: forget it and write its events, atomically. The
        journal's copy goes first: the table's commit moves the journal into the table, which
        would otherwise bring the finished removal back. (If the table write then fails, the
        table's own row keeps the removal pending and it is simply done again.)"""
        journal = self._journal
        if journal is not None and any(
            (r.get("subject"), r.get("action")) == pair for r in journal.entries["removals"]
        ):
            entries = {name: list(items) for name, items in journal.entries.items()}
            entries["removals"] = [
                r for r in entries["removals"] if (r.get("subject"), r.get("action")) != pair
            ]
            try:
                journal.write(entries)
            except (JournalFull, OSError) as exc:
                raise StateError(f"revoke journal write failed: {exc}") from None
        with self._tx() as db:
            db.execute("DELETE FROM removals WHERE subject = ? AND action = ?", pair)
            for event in events:
                _insert_event(db, event)

    # Outbox.

    async def add_event(self, event: OutboxEvent) -> None:
        with self._tx() as db:
            _insert_event(db, event)

    async def pending_events(self, limit: int) -> list[OutboxEvent]:
        rows = self._db.execute(
            f"SELECT {_EVENT_COLUMNS} FROM outbox ORDER BY created LIMIT ?", (limit,)
        ).fetchall()
        return [
            OutboxEvent(
                event_id=row[0],
                kind=row[1],
                grant_id=row[2],
                subject=row[3],
                action=row[4],
                observed_at=from_ms(row[5]),
                details=json.loads(row[6]),
                counter=row[7],
            )
            for row in rows
        ]

    async def outbox_depth(self) -> int:
        """Events waiting for the coordinator (the metrics read it)."""
        row = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(row[0])

    async def delete_events(self, event_ids: Iterable[str]) -> int:
        with self._tx() as db:
            return sum(
                db.execute("DELETE FROM outbox WHERE event_id = ?", (event_id,)).rowcount
                for event_id in set(event_ids)
            )


def _checkpoint(db: sqlite3.Connection) -> tuple[bool, int]:
    """A PASSIVE checkpoint on `db`: whether the whole WAL was copied, and its frames."""
    try:
        busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    except sqlite3.Error as exc:
        # Nothing is lost: the WAL grows until a checkpoint succeeds.
        log.warning("WAL checkpoint failed", extra={"error": str(exc)})
        return False, 0
    return not busy and frames == copied, max(int(frames), 0)


def _lock(path: Path) -> int:
    try:
        return lock_directory(path, what="agent")
    except DirectoryBusy as exc:
        raise StateError(str(exc)) from None
    except OSError as exc:
        raise _open_error(exc, path.parent) from None


def _open_error(exc: BaseException, state_dir: Path) -> StateError:
    """What opening the lease table ran into, named: a full disk first (whatever SQLite called
    it), then a damaged table (the only kind moved aside), then anything else."""
    if isinstance(exc, StateError):
        return exc
    full = disk_full(state_dir)
    if full or is_full_error(exc):
        return DiskFull(full or f"no space left in the state directory {state_dir}")
    if is_corrupt_error(exc):
        return StateUnreadable(f"cannot open the lease table: {type(exc).__name__}: {exc}")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return StateError(f"cannot open the lease table: {type(exc).__name__}: {reason}")


def _put(db: sqlite3.Connection, key: str, value: str) -> None:
    db.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def _raise_epoch(db: sqlite3.Connection, epoch: int) -> None:
    db.execute(
        "INSERT INTO meta (key, value) VALUES ('epoch', :v) ON CONFLICT (key) "
        "DO UPDATE SET value = max(CAST(value AS INTEGER), :v)",
        {"v": epoch},
    )


def _change_locks(db: sqlite3.Connection, change: LockChange) -> None:
    if change.replace:
        db.execute("DELETE FROM locks")
    for lock_id in change.drop:
        db.execute("DELETE FROM locks WHERE lock_id = ?", (lock_id,))
    for lock in change.put:
        db.execute(
            "INSERT INTO locks (lock_id, subject, action, expires_at_ms, reason) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (lock_id) DO UPDATE SET "
            "subject = excluded.subject, action = excluded.action, "
            "expires_at_ms = excluded.expires_at_ms, reason = excluded.reason",
            (
                lock.lock_id,
                lock.subject,
                lock.action,
                None if lock.expires_at is None else to_ms(lock.expires_at),
                lock.reason,
            ),
        )


def _insert_event(db: sqlite3.Connection, event: OutboxEvent) -> None:
    # An event id is written once; writing it again is not a second event (and takes no number).
    if db.execute("SELECT 1 FROM outbox WHERE event_id = ?", (event.event_id,)).fetchone():
        return
    row = db.execute("SELECT value FROM meta WHERE key = 'event_counter'").fetchone()
    counter = int(row[0]) + 1 if row else 1
    _put(db, "event_counter", str(counter))
    db.execute(
        f"INSERT INTO outbox (created, {_EVENT_COLUMNS}) VALUES "
        "((SELECT coalesce(max(created), 0) + 1 FROM outbox), ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (event_id) DO NOTHING",
        (
            event.event_id,
            event.kind,
            event.grant_id,
            event.subject,
            event.action,
            to_ms(event.observed_at),
            json.dumps(dict(event.details), sort_keys=True),
            counter,
        ),
    )


def _upsert_removal(
    db: sqlite3.Connection, removal: Removal, *, only_if_newer: bool = False
) -> None:
    db.execute(
        "INSERT INTO removals (subject, action, grant_ids, attempts, next_at_ms, since_ms, error, "
        "reported) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (subject, action) DO UPDATE SET "
        "grant_ids = excluded.grant_ids, attempts = excluded.attempts, "
        "next_at_ms = excluded.next_at_ms, since_ms = excluded.since_ms, error = excluded.error, "
        "reported = excluded.reported"
        + (" WHERE excluded.attempts > removals.attempts" if only_if_newer else ""),
        (
            removal.pair[0],
            removal.pair[1],
            json.dumps(list(removal.grant_ids)),
            removal.attempts,
            to_ms(removal.next_at),
            to_ms(removal.since),
            removal.error,
            int(removal.reported),
        ),
    )


def _removal_json(removal: Removal) -> dict[str, Any]:
    return {
        "subject": removal.pair[0],
        "action": removal.pair[1],
        "grant_ids": list(removal.grant_ids),
        "attempts": removal.attempts,
        "next_at_ms": to_ms(removal.next_at),
        "since_ms": to_ms(removal.since),
        "error": removal.error,
        "reported": removal.reported,
    }


def _removal_from_json(entry: dict[str, Any]) -> Removal:
    return Removal(
        pair=(str(entry["subject"]), str(entry["action"])),
        grant_ids=tuple(str(g) for g in entry.get("grant_ids", [])),
        attempts=int(entry.get("attempts", 1)),
        next_at=from_ms(int(entry["next_at_ms"])),
        since=from_ms(int(entry["since_ms"])),
        error=str(entry.get("error", "")),
        reported=bool(entry.get("reported", False)),
    )


def _event_json(event: OutboxEvent) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "kind": event.kind,
        "grant_id": event.grant_id,
        "subject": event.subject,
        "action": event.action,
        "observed_at_ms": to_ms(event.observed_at),
        "details": dict(event.details),
    }


def _event_from_json(entry: dict[str, Any]) -> OutboxEvent:
    return OutboxEvent(
        event_id=str(entry["event_id"]),
        kind=str(entry["kind"]),
        grant_id=str(entry.get("grant_id", "")),
        subject=str(entry.get("subject", "")),
        action=str(entry.get("action", "")),
        observed_at=from_ms(int(entry["observed_at_ms"])),
        details={str(k): str(v) for k, v in dict(entry.get("details", {})).items()},
    )


def _lease_row(lease: Lease) -> dict[str, Any]:
    return {
        "grant_id": lease.grant_id,
        "subject": lease.subject,
        "action": lease.action,
        "request_id": lease.request_id,
        "not_before_ms": to_ms(lease.not_before),
        "not_after_ms": to_ms(lease.not_after),
        "offline_mode": lease.offline.mode.value,
        "offline_grace_ms": lease.offline.grace // timedelta(milliseconds=1),
        "state": lease.state.value,
        "seq": lease.seq,
        "applied_at_ms": None if lease.applied_at is None else to_ms(lease.applied_at),
        "removed_at_ms": None if lease.removed_at is None else to_ms(lease.removed_at),
        "remove_reason": lease.remove_reason,
    }


def _lease(row: tuple[Any, ...]) -> Lease:
    return Lease(
        grant_id=row[0],
        subject=row[1],
        action=row[2],
        request_id=row[3],
        not_before=from_ms(row[4]),
        not_after=from_ms(row[5]),
        offline=OfflinePolicy(OfflineMode(row[6]), timedelta(milliseconds=row[7])),
        state=LeaseState(row[8]),
        seq=row[9],
        applied_at=None if row[10] is None else from_ms(row[10]),
        removed_at=None if row[11] is None else from_ms(row[11]),
        remove_reason=row[12],
    )
