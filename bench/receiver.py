"""A webhook receiver in its own process, for the approval scenario with notifications on
(scenario 15): every POST is answered 200 and logged as one line, "MONOTONIC KIND REQUEST_ID",
with the arrival time on the machine's monotonic clock (CLOCK_MONOTONIC: the same clock as the
bench process's `time.monotonic`, so the two can be subtracted).

    python -m bench.receiver PORT LOGFILE
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO


def arrivals(log: Path) -> list[tuple[float, str, str]]:
    """(arrival, kind, request id) of every POST logged so far."""
    out = []
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        at, kind, request_id = [*line.split(" "), "", ""][:3]
        if at and kind:
            out.append((float(at), kind, request_id))
    return out


def main(argv: list[str] | None = None) -> int:
    port_text, log_path = (argv or sys.argv[1:])[:2]
    lock = threading.Lock()
    with Path(log_path).open("a", buffering=1) as log:
        return _serve(int(port_text), log, lock)


def _serve(port: int, log: TextIO, lock: threading.Lock) -> int:

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            at = time.monotonic()
            try:
                notice = json.loads(body)
                kind, request_id = str(notice.get("kind", "")), str(notice.get("request_id", ""))
            except ValueError:
                kind, request_id = "unparsed", ""
            with lock:
                log.write(f"{at:.6f} {kind or '-'} {request_id or '-'}\n")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
