"""A small asyncio TCP fault proxy between an agent and the coordinator.

Faults, each switchable at any time: `blackhole(up, down)` (bytes in that direction are read and
dropped, the connection stays open: a silent partition, one direction or both), `reset()` (every
open connection is closed with an RST), `refuse` (new connections are reset at once), `latency`
(seconds added before each chunk is forwarded), `stall()` (stop reading from the coordinator, as
a stopped agent would) and `flap(period)` (blackhole on and off).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct


class FaultProxy:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self._host = host
        self._upstream = upstream_port
        self.drop_up = False  # agent -> coordinator
        self.drop_down = False  # coordinator -> agent
        self.refuse = False
        self.latency = 0.0
        # Stop reading from the coordinator (a stopped agent): TCP and HTTP/2 flow control push
        # back, the coordinator's writes block and its per-agent queue fills.
        self.stall_down = asyncio.Event()
        self.stall_down.set()
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self._host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self._host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def blackhole(self, up: bool = True, down: bool = True) -> None:
        self.drop_up, self.drop_down = up, down

    def heal(self) -> None:
        self.drop_up = self.drop_down = self.refuse = False
        self.latency = 0.0
        self.stall_down.set()

    def stall(self) -> None:
        self.stall_down.clear()

    def reset(self) -> None:
        """Close every open connection with an RST (SO_LINGER 0)."""
        for a, b in list(self._pipes):
            for writer in (a, b):
                _rst(writer)
        self._pipes.clear()

    async def flap(self, period: float, times: int) -> None:
        for _ in range(times):
            self.blackhole()
            await asyncio.sleep(period)
            self.heal()
            await asyncio.sleep(period)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.reset()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            _rst(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._upstream)
        except OSError:
            _rst(writer)
            return
        self.connections += 1
        pipe = (writer, up_writer)
        self._pipes.add(pipe)
        for task in (
            asyncio.create_task(self._pump(reader, up_writer, up=True)),
            asyncio.create_task(self._pump(up_reader, writer, up=False)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        try:
            while True:
                if not up:
                    await self.stall_down.wait()
                data = await reader.read(65536)
                if not data:
                    break
                if self.latency:
                    await asyncio.sleep(self.latency)
                if self.drop_up if up else self.drop_down:
                    continue
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()
