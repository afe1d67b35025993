"""Who is on the other end of the socket: the kernel's answer (SO_PEERCRED), never the caller's."""

from __future__ import annotations

import pwd
import socket
import struct
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    uid: int
    gid: int
    pid: int
    # The local user name of `uid` (None: no such user in the passwd database).
    user: str | None

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def peer_of(sock: socket.socket) -> Caller:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Caller(uid=uid, gid=gid, pid=pid, user=user_name(uid))


def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
