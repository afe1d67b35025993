"""The coordinator's HTTP endpoint for Slack interactions (served only when configured)."""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .slack import SlackInteractions

INTERACTIONS_PATH = "/slack/interactions"
MAX_BODY = 64 * 1024  # Slack's interaction payloads are a few KiB


def interactions_app(slack: SlackInteractions) -> Starlette:
    async def interactions(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY:
            return Response("too large", status_code=413)
        status = await slack.handle(request.headers, body)
        return Response(status_code=status)

    return Starlette(routes=[Route(INTERACTIONS_PATH, interactions, methods=["POST"])])


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (port 0: any free port; read it with getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if port:
        # A restart rebinds its fixed port at once. Never with port 0: Linux may then hand out
        # a port another SO_REUSEADDR socket has bound but not yet listens on (the gRPC
        # server's, between its bind and its start).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve(app: Starlette, sock: socket.socket) -> None:
    """Serve `app` on `sock` until cancelled. Not `uvicorn.Server.serve()`: that takes over the
    process's signal handlers, which belong to the coordinator's entry point."""
    config = uvicorn.Config(app, log_config=None, lifespan="off", access_log=False)
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    try:
        await asyncio.Event().wait()
    finally:
        server.should_exit = True
        await server.shutdown(sockets=[sock])
