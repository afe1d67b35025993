"""Receiver secrets at rest: sealed with the coordinator's notify key (Fernet: AES-128-CBC with
HMAC-SHA256), or a reference `file:<path>` read each time it is needed (kept by a secrets
manager or a mounted volume). Never logged, never shown, never in an error message."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

FILE_PREFIX = "file:"
SEALED_PREFIX = "sealed:"
KEY_FILE = "notify.key"


class SecretError(Exception):
    pass


class Sealer:
    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    @classmethod
    def open(cls, data_dir: Path) -> Sealer:
        """The key in `data_dir/notify.key` (0600), made on first use. With several replicas,
        give each the same key file."""
        path = data_dir / KEY_FILE
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key())
        return cls(path.read_bytes().strip())

    def seal(self, secret: str) -> str:
        """What the store keeps for a secret given as a value or as `file:<path>`."""
        if secret.startswith(FILE_PREFIX):
            path = Path(secret[len(FILE_PREFIX) :])
            if not path.is_absolute():
                raise SecretError("a secret file must be given as an absolute path")
            return secret
        if not secret:
            return ""
        return SEALED_PREFIX + self._fernet.encrypt(secret.encode()).decode()

    def open_secret(self, stored: str) -> str:
        if not stored:
            return ""
        if stored.startswith(FILE_PREFIX):
            try:
                return Path(stored[len(FILE_PREFIX) :]).read_text().strip()
            except OSError as exc:
                raise SecretError(f"cannot read the secret file ({exc.strerror})") from None
        if stored.startswith(SEALED_PREFIX):
            try:
                return self._fernet.decrypt(stored[len(SEALED_PREFIX) :].encode()).decode()
            except InvalidToken:
                raise SecretError("cannot open the secret (another notify.key?)") from None
        raise SecretError("unknown secret form")

    @staticmethod
    def describe(stored: str) -> str:
        """What may be shown about a stored secret: its form, never its value."""
        if not stored:
            return "none"
        if stored.startswith(FILE_PREFIX):
            return stored  # the path, which is not the secret
        return "sealed"
