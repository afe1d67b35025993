"""Key material shared by coordinator replicas through the store, encrypted.

Replicas on one PostgreSQL store must sign commands with the same keys (an agent pins the keys
it enrolled with) and issue certificates from the same CA (an agent enrolled on one replica
connects to another with mTLS). These files of the data directory are therefore kept in the
store's `secrets` table, encrypted with Fernet (AES-CBC + HMAC, from `cryptography`) under a key
each replica reads from `--secret-key-file` or `JITMESH_SECRET_KEY`; the database never holds
them in clear, and a database backup alone does not give them away.

The store is the truth: at start a replica writes the store's copy into its data directory
(0600) before anything opens the files, or, when the store has none yet (the first replica, or
an installation moving from SQLite), uploads its own. After a rotation the rotating replica
uploads the new file; the others pick it up within `REFRESH` (a command signed meanwhile with the
previous key still verifies: retired keys stay valid for a day).
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from jitmesh.clock import Clock
from server.domain.errors import Unavailable
from server.domain.ports import Store
from server.signing import write_private

log = logging.getLogger(__name__)

# Data-directory files every replica shares (relative paths).
SHARED_FILES = ("signing_keys.json", "ca/ca.key", "ca/ca.pem")
REFRESH = timedelta(seconds=5)
KEY_ENV = "JITMESH_SECRET_KEY"


class SecretKeyError(Exception):
    """No usable key to encrypt the shared key material with: says what to do."""


def new_key() -> str:
    return Fernet.generate_key().decode()


def load_key(path: Path | None) -> Fernet:
    """The replicas' shared encryption key: from `path`, else from JITMESH_SECRET_KEY."""
    if path is not None:
        try:
            text = path.read_text(encoding="ascii").strip()
        except OSError as exc:
            raise SecretKeyError(
                f"cannot read the secret key file {path}: {exc.strerror}"
            ) from None
    else:
        text = os.environ.get(KEY_ENV, "").strip()
        if not text:
            raise SecretKeyError(
                "replicas on PostgreSQL share their signing keys and CA encrypted: give every "
                f"replica the same key with --secret-key-file PATH or {KEY_ENV} (make one with "
                "`jitmesh-coordinator new-secret-key`)"
            )
    try:
        if len(base64.urlsafe_b64decode(text.encode())) != 32:
            raise ValueError
        return Fernet(text.encode())
    except ValueError:
        raise SecretKeyError(
            "the secret key is not a Fernet key (32 bytes, URL-safe base64); make one with "
            "`jitmesh-coordinator new-secret-key`"
        ) from None


class SharedFiles:
    def __init__(self, store: Store, data_dir: Path, box: Fernet) -> None:
        self._store = store
        self._dir = data_dir
        self._box = box
        self._seen: dict[str, bytes] = {}

    async def sync(self, clock: Clock) -> list[str]:
        """Make the data directory's shared files the store's. Returns the files that changed on
        disk. Never uploads: files the store lacks go up through `claim_missing` only, all or
        none and never over another replica's (two replicas whose data directories each hold
        keys, started on an empty store, would otherwise each upload theirs file by file and
        leave one's signing keys beside the other's CA)."""
        changed: list[str] = []
        for name in SHARED_FILES:
            path = self._dir / name
            stored = await self._store.get_secret(name)
            if stored is None:
                continue
            if self._seen.get(name) == stored:
                continue
            try:
                plain = self._box.decrypt(stored)
            except InvalidToken:
                raise SecretKeyError(
                    f"the shared {name} in the store does not decrypt with this replica's "
                    "secret key: every replica needs the same key"
                ) from None
            self._seen[name] = stored
            if not path.exists() or path.read_bytes() != plain:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                write_private(path, plain)
                changed.append(name)
        return changed

    async def push(self, name: str, clock: Clock) -> None:
        """Upload the data directory's `name` (after creating or rotating it)."""
        ciphertext = self._box.encrypt((self._dir / name).read_bytes())
        await self._store.put_secret(name, ciphertext, clock.now())
        self._seen[name] = ciphertext

    async def claim_missing(self, clock: Clock, *, adopt: bool = True) -> bool:
        """Upload the shared files made here at start that the store does not hold yet. Two
        replicas starting at once on an empty store both make keys and a CA: the first to
        upload wins, all files or none (a signing key from one replica beside a CA key from
        the other would serve nobody), and the other takes the winner's files. True: the files
        on disk changed, open them again (before serving: a TLS certificate from the losing CA
        would be refused by every agent and client trusting the store's). `adopt=False`
        (moving an installation in): the data directory's files are never replaced; a store
        that holds others already is an error."""
        made = [n for n in SHARED_FILES if n not in self._seen and (self._dir / n).exists()]
        if not made:
            return False
        mine = [(n, self._box.encrypt((self._dir / n).read_bytes())) for n in made]
        if await self._store.add_secrets(mine, clock.now()):
            self._seen.update(mine)
            return False
        if not adopt:
            raise SecretKeyError(
                "the store already holds signing keys or a CA (another installation's, or a "
                "replica already started on it): move into an empty database"
            )
        changed = await self.sync(clock)
        log.info("another replica made the shared key material first; using it")
        return bool(changed)

    async def run(self, clock: Clock, on_change: Callable[[list[str]], None]) -> None:
        """Every REFRESH, take the store's newer files; `on_change(names)` reloads them."""
        while True:
            await clock.sleep(REFRESH.total_seconds())
            try:
                changed = await self.sync(clock)
            except (OSError, SecretKeyError, Unavailable) as exc:
                log.warning("shared key material not refreshed: %s", exc)
                continue
            if changed:
                log.info("shared key material changed files=%s", ",".join(changed))
                on_change(changed)
