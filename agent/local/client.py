"""The client half of the agent's socket, for `check` and `exec`: plain blocking sockets, no
asyncio (check runs on every login and sudo call)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from agent.local.protocol import MAX_LINE, SOCKET_NAME, ProtocolError, decode, encode


class Unreachable(Exception):
    """No agent answers on the state directory's socket."""


class Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""

    @classmethod
    def open(cls, state_dir: Path, *, timeout: float | None = 30.0) -> Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(state_dir / SOCKET_NAME))
        except OSError as exc:
            sock.close()
            raise Unreachable(f"the agent is not reachable ({exc.strerror or exc})") from None
        return cls(sock)

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(encode(message))

    def receive(self) -> dict[str, Any] | None:
        """The next message (None: the agent closed the connection)."""
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE:
                raise ProtocolError("message too long")
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return decode(line)

    def has_message(self) -> bool:
        return b"\n" in self._buffer

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ask(state_dir: Path, message: dict[str, Any], *, timeout: float = 30.0) -> dict[str, Any]:
    """One request, one answer."""
    with Connection.open(state_dir, timeout=timeout) as connection:
        connection.send(message)
        answer = connection.receive()
    if answer is None:
        raise Unreachable("the agent closed the connection without an answer")
    return answer
