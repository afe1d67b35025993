"""systemd's service notification protocol (sd_notify(3)), for `Type=notify` units: READY=1 once
the daemon can serve, WATCHDOG=1 pings from the event loop, STOPPING=1 when shutdown begins.

Hand-written on purpose: the protocol is one datagram to the unix socket named by
$NOTIFY_SOCKET (an abstract one when the name starts with @), and the maintained alternatives
either wrap libsystemd (a C library the agent's hosts may lack) or are unmaintained. Without
$NOTIFY_SOCKET (not under systemd) every call does nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"


def notify(*states: str) -> bool:
    """Send `READY=1`, `STATUS=...` and the like in one datagram. False when not under systemd
    or the socket is gone (a notification is never worth failing the daemon for)."""
    address = os.environ.get(ENV_SOCKET)
    if not address or not states:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
    except OSError:
        return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def stopping(status: str = "") -> bool:
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    return notify("RELOADING=1")


def watchdog_interval() -> float | None:
    """Seconds between pings (half systemd's WatchdogSec), or None when no watchdog is asked
    for this process."""
    usec = os.environ.get(ENV_WATCHDOG_USEC, "")
    pid = os.environ.get(ENV_WATCHDOG_PID, "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2


async def watchdog() -> None:
    """Ping the watchdog for as long as the event loop runs: a loop that is stuck stops the
    pings, and systemd restarts the daemon. Returns at once when there is no watchdog."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
