"""`jitmesh-web`: serve the web page. Flags, then JITMESH_WEB_* environment variables."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import grpc
import uvicorn

from .app import WebSettings, create_app


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="jitmesh-web",
        description="The jitmesh web page: request, review and watch access in a browser.",
        epilog="example: jitmesh-web --coordinator 127.0.0.1:7443 --listen 127.0.0.1:8080 "
        "--dev-token-sign-in --insecure-cookies",
    )
    p.add_argument("--coordinator", default=env("JITMESH_WEB_COORDINATOR", "127.0.0.1:7443"))
    p.add_argument("--listen", default=env("JITMESH_WEB_LISTEN", "127.0.0.1:8080"))
    p.add_argument(
        "--public-url",
        default=env("JITMESH_WEB_PUBLIC_URL", ""),
        help="the address people open (default http://LISTEN); the identity provider must "
        "allow PUBLIC_URL/signin/callback as a redirect",
    )
    p.add_argument("--ca-file", default=env("JITMESH_WEB_CA_FILE", ""), help="coordinator TLS CA")
    p.add_argument(
        "--dev-token-sign-in",
        action="store_true",
        default=env("JITMESH_WEB_DEV_TOKEN_SIGN_IN") == "1",
        help="also allow signing in with a jitmesh token (development only)",
    )
    p.add_argument(
        "--insecure-cookies",
        action="store_true",
        help="session cookies without the Secure flag (plain HTTP on a host other than "
        "localhost; never in production)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s %(message)s")
    host, _, port_text = args.listen.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        sys.exit(f"jitmesh-web: --listen must be HOST:PORT, not {args.listen!r}")
    host = host.strip("[]") or "127.0.0.1"
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    if port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sys.exit(f"jitmesh-web: cannot listen on {args.listen}: {exc.strerror}")
    bound = sock.getsockname()[1]
    public_url = args.public_url or f"http://{host}:{bound}"
    credentials = None
    if args.ca_file:
        try:
            ca = Path(args.ca_file).read_bytes()
        except OSError as exc:
            sys.exit(
                f"jitmesh-web: cannot read --ca-file {args.ca_file}: {exc.strerror} (give the "
                "coordinator's CA certificate: ca/ca.pem in its data directory)"
            )
        credentials = grpc.ssl_channel_credentials(ca)
    settings = WebSettings(
        coordinator=args.coordinator,
        public_url=public_url,
        token_sign_in=args.dev_token_sign_in,
        credentials=credentials,
        secure_cookies=not args.insecure_cookies,
        session_idle=timedelta(hours=8),
    )
    app = create_app(settings)
    # The one line scripts wait for (the quickstart prints it).
    print(f"jitmesh-web listening on {public_url}", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
