"""The baseline: a minimal grpc.aio bidirectional stream that pushes a message of about the size
of a jitmesh grant command and waits for an ack of about the size of an agent's Ack. No storage,
no policy, no protobuf schema (raw bytes): the floor our stack can reach on this machine.

    python -m bench.baseline serve PORT      # the "coordinator" end, for the multi-agent runs
    python -m bench.baseline client TARGET   # the "agent" end, one stream, acks every message
    python -m bench.baseline clients TARGET N  # N of them, each on its own connection

Each takes `--tls DIR` (files from `tls_files`): then the server wants a client certificate and
every client presents one, both from one ECDSA P-256 CA like the coordinator's internal CA, so
the TLS figures compare mTLS with mTLS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from .waiting import until

SERVICE = "bench.Baseline"
CONNECT = f"/{SERVICE}/Connect"
FANOUT = f"/{SERVICE}/Fanout"
ECHO = f"/{SERVICE}/Echo"
# A signed grant command as the coordinator writes it is a few hundred bytes; an Ack about 60.
PUSH_BYTES = 400
ACK_BYTES = 60
EOF_ = grpc.aio.EOF  # type: ignore[attr-defined]
LOCAL_POOL = ("grpc.use_local_subchannel_pool", 1)


class _Session:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.waiting: dict[int, asyncio.Future[None]] = {}


class BaselineServer:
    """Holds the streams; `push` times one round trip, `fanout` one message (or a few) to every
    stream."""

    def __init__(self) -> None:
        self.sessions: list[_Session] = []
        self._ids = itertools.count(1)
        self._server: grpc.aio.Server | None = None

    async def start(self, port: int = 0, tls: Path | None = None) -> int:
        server = grpc.aio.server(options=[("grpc.server.max_pending_requests", 20000)])
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Connect": grpc.stream_stream_rpc_method_handler(self._connect),
                "Fanout": grpc.unary_unary_rpc_method_handler(self._fanout),
                "Echo": grpc.unary_unary_rpc_method_handler(self._echo),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        if tls is None:
            bound = server.add_insecure_port(f"127.0.0.1:{port}")
        else:
            creds = grpc.ssl_server_credentials(
                [((tls / "server.key").read_bytes(), (tls / "server.pem").read_bytes())],
                root_certificates=(tls / "ca.pem").read_bytes(),
                require_client_auth=True,
            )
            bound = server.add_secure_port(f"127.0.0.1:{port}", creds)
        await server.start()
        self._server = server
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    async def wait_streams(self, count: int, within: float = 60.0) -> None:
        await until(lambda: len(self.sessions) >= count, within, f"{count} baseline streams")

    def _send(self, session: _Session) -> asyncio.Future[None]:
        mid = next(self._ids)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        session.waiting[mid] = done
        session.queue.put_nowait(mid.to_bytes(8, "big") + bytes(PUSH_BYTES - 8))
        return done

    async def push(self, index: int = 0) -> float:
        """One push and its ack on stream `index`: the round trip in seconds."""
        started = time.perf_counter()
        await self._send(self.sessions[index])
        return time.perf_counter() - started

    async def fanout(self, messages: int = 1) -> float:
        """`messages` to every stream at once (queued back to back, as the coordinator pushes a
        batch), until every ack is in."""
        started = time.perf_counter()
        await asyncio.gather(*(self._send(s) for s in list(self.sessions) for _ in range(messages)))
        return time.perf_counter() - started

    async def _connect(self, _requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        session = _Session()
        self.sessions.append(session)

        async def writer() -> None:
            while True:
                await context.write(await session.queue.get())

        task = asyncio.create_task(writer())
        try:
            while True:
                message = await context.read()
                if message is EOF_:
                    return
                done = session.waiting.pop(int.from_bytes(message[:8], "big"), None)
                if done is not None and not done.done():
                    done.set_result(None)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.sessions.remove(session)

    async def _fanout(self, request: bytes, _context: Any) -> bytes:
        count = len(self.sessions)
        elapsed = await self.fanout(int(request or b"1"))
        return f"{elapsed} {count}".encode()

    async def _echo(self, request: bytes, _context: Any) -> bytes:
        return request[:ACK_BYTES]


def tls_files(directory: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made by the
    coordinator's own CA code (ECDSA P-256), in `directory`."""
    from agent.identity import new_key_and_csr
    from server.ca import InternalCA

    now = datetime.now(UTC)
    ca = InternalCA.open(directory, now)
    server = ca.server_tls(["127.0.0.1"], now)
    key_pem, csr = new_key_and_csr("baseline")
    files = {
        "ca.pem": ca.ca_pem,
        "server.key": server.key_pem,
        "server.pem": server.cert_pem,
        "client.key": key_pem,
        "client.pem": ca.sign_agent_csr(csr, "baseline", now).pem,
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def _channel(target: str, tls: Path | None, options: list[tuple[str, int]]) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    creds = grpc.ssl_channel_credentials(
        (tls / "ca.pem").read_bytes(),
        (tls / "client.key").read_bytes(),
        (tls / "client.pem").read_bytes(),
    )
    return grpc.aio.secure_channel(target, creds, options=options)


async def client_stream(
    target: str,
    on_message: Callable[[float], None] | None = None,
    tls: Path | None = None,
) -> None:
    """One agent-like stream on its own connection: ack every message, until cancelled."""
    async with _channel(target, tls, [LOCAL_POOL]) as channel:
        connect = channel.stream_stream(CONNECT, None, None)
        call = connect(None)
        while True:
            message = await call.read()
            if not isinstance(message, bytes):
                return
            if on_message is not None:
                on_message(time.monotonic())
            await call.write(message[:8] + bytes(ACK_BYTES - 8))


async def fanout(target: str, tls: Path | None = None, messages: int = 1) -> tuple[float, int]:
    """`messages` (one by default) to every stream of the server at `target`, timed there from
    the first push until the last ack is in. Returns (seconds, streams)."""
    async with _channel(target, tls, []) as channel:
        reply = await channel.unary_unary(FANOUT, None, None)(str(messages).encode(), timeout=600)
        assert isinstance(reply, bytes)
        elapsed, count = reply.decode().split()
        return float(elapsed), int(count)


async def clients(target: str, count: int, tls: Path | None = None) -> None:
    """`count` agent-like streams, each on its own connection, until cancelled."""
    async with asyncio.TaskGroup() as tasks:
        for _ in range(count):
            tasks.create_task(client_stream(target, tls=tls))


async def _serve(port: int, tls: Path | None) -> None:
    server = BaselineServer()
    await server.start(port, tls)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.baseline")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve").add_argument("port", type=int)
    sub.add_parser("client").add_argument("target")
    many = sub.add_parser("clients")
    many.add_argument("target")
    many.add_argument("count", type=int)
    p.add_argument("--tls", type=Path, help="mTLS with the files in this directory")
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        if args.command == "serve":
            asyncio.run(_serve(args.port, args.tls))
        elif args.command == "clients":
            asyncio.run(clients(args.target, args.count, args.tls))
        else:
            asyncio.run(client_stream(args.target, tls=args.tls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
