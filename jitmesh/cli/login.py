"""jitctl login / whoami: single sign-on through the browser, and who the CLI acts as.

`login` asks the coordinator which identity provider it trusts, signs in there with the
authorization code flow and PKCE on a loopback redirect (RFC 8252: the browser comes back to
http://127.0.0.1:PORT/callback, a one-shot listener of this process), exchanges the ID token
for a short-lived jitmesh token, and keeps it (0600) in the active profile's token_file, else
in the CLI's token file ($JITMESH_TOKEN_FILE or ~/.config/jitmesh/token): the file later
commands with that profile read when no --token or JITMESH_TOKEN is given."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import sys
import webbrowser
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

import click
import httpx

from jitmesh.cli import output
from jitmesh.cli.core import (
    DURATION,
    ENV_TOKEN,
    CommandFailed,
    Output,
    command,
    login_token_file,
    settings,
    write_secret,
)
from jitmesh.client import Client

_PAGE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nConnection: close\r\n"
    b"Content-Security-Policy: default-src 'none'\r\n\r\n"
    b"<!doctype html><title>jitmesh</title><p>%s You can close this tab.</p>"
)


async def _login_flow(
    client: Client, *, open_browser: bool, wait: float, ttl: timedelta | None
) -> tuple[str, Any]:
    config = await client.sign_in_config()
    async with httpx.AsyncClient(timeout=10.0) as http:
        discovery = (
            await http.get(config.issuer.rstrip("/") + "/.well-known/openid-configuration")
        ).json()
        verifier = secrets.token_urlsafe(48)
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        arrived: asyncio.Future[dict[str, list[str]]] = asyncio.get_running_loop().create_future()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                line = (await reader.readline()).decode("latin-1")
                parts = line.split(" ")
                query = parse_qs(urlparse(parts[1]).query) if len(parts) > 1 else {}
                ours = query.get("state") == [state]
                text = b"Signed in to jitmesh." if ours and "code" in query else b"Not signed in."
                writer.write(_PAGE % text)
                await writer.drain()
                if ours and not arrived.done():
                    arrived.set_result(query)
            finally:
                writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            redirect = f"http://127.0.0.1:{port}/callback"
            query = {
                "client_id": config.client_id, "response_type": "code",
                "scope": " ".join(config.scopes), "redirect_uri": redirect,
                "code_challenge": challenge, "code_challenge_method": "S256",
                "state": state, "nonce": nonce,
            }  # fmt: skip
            url = f"{discovery['authorization_endpoint']}?{urlencode(query)}"
            print(f"Open this address to sign in:\n{url}", file=sys.stderr, flush=True)
            if open_browser:
                webbrowser.open(url)
            try:
                async with asyncio.timeout(wait):
                    answer = await arrived
            except TimeoutError:
                raise CommandFailed("sign-in timed out; run jitctl login again") from None
        if "code" not in answer:
            error = answer.get("error", ["unknown"])[0][:64]
            raise CommandFailed(f"the identity provider refused the sign-in: {error}")
        response = await http.post(
            discovery["token_endpoint"],
            data={
                "grant_type": "authorization_code", "code": answer["code"][0],
                "redirect_uri": redirect, "client_id": config.client_id,
                "code_verifier": verifier,
            },
        )  # fmt: skip
        if not response.is_success or "id_token" not in response.json():
            raise CommandFailed(
                f"the identity provider gave no ID token (HTTP {response.status_code})"
            )
        id_token = str(response.json()["id_token"])
    token, info = await client.exchange_id_token(id_token, nonce=nonce, ttl=ttl)
    return token, info


def register(parent: click.Group) -> None:
    @command(
        parent,
        "login",
        help="Sign in through your identity provider (single sign-on) and keep the token.",
        examples=["jitctl login", "jitctl login --no-browser --ttl 8h"],
    )
    @click.option("--no-browser", is_flag=True, help="Print the address; do not open a browser.")
    @click.option(
        "--wait", default=300.0, type=float, help="Seconds to wait for the browser's sign-in."
    )
    @click.option("--ttl", type=DURATION, metavar="DURATION", help="Token lifetime (capped).")
    async def _login(
        client: Client, out: Output, *, no_browser: bool, wait: float, ttl: timedelta | None
    ) -> None:
        config = settings()
        # Found before signing in: a bad profile fails before the browser is involved.
        path = login_token_file(config)
        token, info = await _login_flow(client, open_browser=not no_browser, wait=wait, ttl=ttl)
        write_secret(path, token + "\n")
        ends = output.relative(info.expires_at, out.now) if info.expires_at else "never"
        profile = config.connection().profile
        text = f"signed in as {info.user}; token saved to {path} (expires {ends})"
        if config.token or os.environ.get(ENV_TOKEN):
            text += f"\nnote: --token or ${ENV_TOKEN} is given and is used before this file"
        out.emit(
            {
                "user": info.user,
                "expires_at": output.rfc3339(info.expires_at),
                "token_file": str(path),
                "profile": profile,
            },
            text,
        )

    @command(
        parent,
        "whoami",
        help="Show the user this CLI acts as, and its groups.",
        examples=["jitctl whoami", "jitctl whoami -o json"],
    )
    async def _whoami(client: Client, out: Output) -> None:
        me = await client.whoami()
        out.emit(
            {"user": me.name, "groups": list(me.groups), "managed_by": me.managed_by},
            output.details(
                [("user", me.name), ("groups", ", ".join(me.groups)), ("managed by", me.managed_by)]
            ),
        )


__all__ = ["register"]
