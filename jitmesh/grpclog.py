"""gRPC's own log lines, kept out of the programs' output.

gRPC's C core writes its own lines to the process's file descriptor 2, in glog's format
(`I1206 18:25:21.356917    7524 chttp2_transport.cc:1403] ... Got goaway`), at a verbosity it
reads from `GRPC_VERBOSITY` and `GRPC_TRACE` once, when `grpc` is first imported; unset, it
prints its INFO lines. So the entry points choose before that import:

- `quiet(verbosity)`: tools that report errors themselves (jitctl, jitmesh-web) and the tests
  set the core's verbosity for their own process only.
- `capture(...)`: the daemons read the core's lines from a pipe on descriptor 2 and log them as
  their own structured records (logger `grpc.core`: errors and warnings kept, INFO dropped). With
  `handshakes`, the core's handshake trace is turned on too and each failed TLS handshake
  becomes one line naming the peer: gRPC's Python API offers no other way to see a connection
  that failed before it carried a call (interceptors see calls only; grpc/grpc#32893 asks for
  exactly this line).

A user who sets `GRPC_VERBOSITY` or `GRPC_TRACE` gets what they asked for: nothing here changes
them and the core's lines stay as the core writes them. The variables are set only around the
import and restored afterwards, so child processes choose for themselves. Standard library only
(grpc is imported here, on purpose, and nowhere earlier in an entry point).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import re
import select
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

from jitmesh import telemetry

VERBOSITY: Final = "GRPC_VERBOSITY"
TRACE: Final = "GRPC_TRACE"
CORE_LOGGER: Final = "grpc.core"

# `I1206 18:25:21.356917    7524 file.cc:123] text`
_RECORD = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ([\w./-]+:\d+)\] ?(.*)$")
# Lines that continue a record: the core prints multi-line statuses ("=== Source Location
# Trace: ===", then file:line lines, then the rest of the message on a line of its own).
_SOURCE = re.compile(r"^(===.*===|\S+\.(?:cc|h):\d+)$")
_CONTINUATION = re.compile(r"^(===|\S+\.(?:cc|h):\d+$| )")
_LEVELS: Final = {
    "I": logging.DEBUG,
    "W": logging.WARNING,
    "E": logging.ERROR,
    "F": logging.CRITICAL,
}
# The handshake trace's line for a server-side handshake that failed: the status, then (after
# the continuation lines) the connection's channel args, with both addresses.
_FAILED = re.compile(r"^CallNextHandshakerLocked: error=(.*?)\s+shutdown=", re.DOTALL)
_PEER = re.compile(r"grpc\.internal\.endpoint_peer_address=(?:ipv[46]:)?([^,}\s]+)")
_LOCAL = re.compile(r"grpc\.internal\.endpoint_local_address=(?:ipv[46]:)?([^,}\s]+)")
_SERVER_SIDE = "grpc.internal.server_credentials="
# The core's own warning that INFO is on: we turned it on to read the handshake trace.
_INFO_WARNING = "Log level INFO is not suitable for production"
# A pipe larger than the default 64 KiB: the core's threads never wait on a slow reader.
_PIPE_SIZE: Final = 1 << 20
_F_SETPIPE_SZ: Final = 1031
# Seconds of quiet after which the record read last is complete.
_PAUSE: Final = 0.05


def user_chose() -> bool:
    """The user set the core's verbosity or tracers: leave them and its lines alone."""
    return VERBOSITY in os.environ or TRACE in os.environ


def quiet(verbosity: str = "NONE") -> None:
    """Import grpc with its core logging at `verbosity` (NONE, ERROR, INFO, DEBUG) in this
    process, unless the user chose. Call before anything imports grpc; afterwards it can only
    leave things as they are."""
    if "grpc" in sys.modules or user_chose():
        return
    with _environment({VERBOSITY: verbosity}):
        import grpc  # noqa: F401  (the core reads its log settings at this import)


@dataclass
class _Limit:
    """At most `per_minute` lines a minute; what was held back is counted on the next one."""

    per_minute: int = 10
    window_started: float = 0.0
    used: int = 0
    held: int = 0

    def take(self, now: float) -> int | None:
        """The number of lines held back before this one, or None to hold this one back."""
        if now - self.window_started >= 60.0:
            self.window_started, self.used = now, 0
        if self.used >= self.per_minute:
            self.held += 1
            return None
        self.used += 1
        held, self.held = self.held, 0
        return held


@dataclass
class CoreLog:
    """The reader of the core's lines (see `capture`). `stderr` is the process's original
    standard error: lines that are not the core's are copied there unchanged."""

    stderr: int
    reader: int
    handshakes: logging.Logger | None
    limit: _Limit = field(default_factory=_Limit)
    _pending: list[str] = field(default_factory=list)
    # The last line read was the core's (a record or its continuation).
    _in_core: bool = False

    def run(self) -> None:
        buffer = b""
        with os.fdopen(self.reader, "rb", buffering=0) as pipe:
            while True:
                if self._pending or buffer:
                    # A record may go on in the next write (a long one is split): wait briefly
                    # for it; a record is complete once the core has paused.
                    ready, _, _ = select.select([pipe], [], [], _PAUSE)
                    if not ready:
                        if buffer:
                            self.line(buffer.decode(errors="replace"))
                            buffer = b""
                        self.flush()
                        continue
                chunk = pipe.read(65536)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self.line(line.decode(errors="replace"))
        if buffer:
            self.line(buffer.decode(errors="replace"))
        self.flush()

    def line(self, text: str) -> None:
        if self._in_core and (not text.strip() or _CONTINUATION.match(text)):
            # Part of the core's record (its status's source locations, the rest of a message).
            if self._pending:
                self._pending.append(text)
            return
        self.flush()
        self._in_core = _RECORD.match(text) is not None
        if self._in_core:
            self._pending.append(text)
        else:
            self._raw(text + "\n")

    def flush(self) -> None:
        if not self._pending:
            return
        first, *more = self._pending
        self._pending = []
        match = _RECORD.match(first)
        assert match is not None
        letter, source, message = match.groups()
        text = "\n".join([message, *more])
        if self.handshakes is not None and self._handshake(text):
            return
        if letter == "W" and message.startswith(_INFO_WARNING):
            return
        logger = logging.getLogger(CORE_LOGGER)
        level = _LEVELS[letter]
        if logger.isEnabledFor(level):
            logger.log(level, message, extra={"source": source, "detail": "\n".join(more)})

    def _handshake(self, text: str) -> bool:
        """A record of the handshake trace: True once handled (logged or dropped)."""
        if not text.startswith(("CallNextHandshakerLocked", "handshake_manager", "handshake ")):
            return False
        # The status's source locations are not part of what went wrong.
        body = " ".join(line for line in text.split("\n") if not _SOURCE.match(line.strip()))
        failed = _FAILED.match(body)
        if failed is None or failed.group(1) == "OK" or _SERVER_SIDE not in body:
            return True
        if self.handshakes is None:
            return True
        held = self.limit.take(time.monotonic())
        if held is None:
            return True
        peer, local = _PEER.search(text), _LOCAL.search(text)
        self.handshakes.warning(
            "TLS handshake failed",
            extra={
                telemetry.PEER: peer.group(1) if peer else "unknown",
                telemetry.ADDRESS: local.group(1) if local else "",
                telemetry.ERROR: failed.group(1).strip(),
                "not_logged": held or None,
            },
        )
        return True

    def _raw(self, text: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self.stderr, text.encode())


def capture(*, handshakes: logging.Logger | None = None) -> CoreLog | None:
    """Route the core's lines on descriptor 2 into this process's logging, then import grpc.

    Descriptor 2 becomes a pipe read by a daemon thread; `sys.stderr` moves to a copy of the
    original, so Python's own writes (logging, tracebacks) never pass through the pipe. Core
    records become `grpc.core` log records (their INFO lines at DEBUG); any other line written to
    descriptor 2 (a child's, a C library's) is copied to the original unchanged. With
    `handshakes`, each failed server-side TLS handshake is logged there as "TLS handshake
    failed" with `peer` (host:port), `address` (ours) and the core's `error`, at most 10 lines a
    minute (the next line says how many were not logged).

    Does nothing (returns None) when the user set GRPC_VERBOSITY or GRPC_TRACE, or when grpc
    is already imported (in-process tests): the core's settings were chosen then.
    """
    if "grpc" in sys.modules or user_chose():
        return None
    original = os.dup(2)
    reader, writer = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(writer, _F_SETPIPE_SZ, _PIPE_SIZE)
    os.set_inheritable(original, False)
    os.dup2(writer, 2)
    os.close(writer)
    sys.stderr.flush()
    sys.stderr = io.TextIOWrapper(
        os.fdopen(original, "wb", buffering=0, closefd=False),
        encoding=sys.stderr.encoding,
        errors="backslashreplace",
        line_buffering=True,
    )
    core = CoreLog(stderr=original, reader=reader, handshakes=handshakes)
    threading.Thread(target=core.run, name="grpc-core-log", daemon=True).start()
    settings = {VERBOSITY: "INFO", TRACE: "handshaker"} if handshakes else {VERBOSITY: "ERROR"}
    with _environment(settings):
        import grpc  # noqa: F401  (the core reads its log settings at this import)
    return core


@contextlib.contextmanager
def _environment(settings: Mapping[str, str]) -> Iterator[None]:
    """`settings` in os.environ for the duration, then as before (children choose for
    themselves)."""
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
