"""Runs the real OpenID Connect provider (npm's oidc-provider 8.x under the machine's Node.js)
for the sign-in tests, and a minimal "browser" that signs a person in through its pages."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import secrets
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlparse

import httpx
from joserfc.jwk import KeySet

HERE = Path(__file__).parent
CLIENT_ID = "jitmesh"
_install_lock = threading.Lock()


def install() -> None:
    """`npm ci` from the committed lock file (once; offline when npm's cache has the packages)."""
    with _install_lock:
        if (HERE / "node_modules" / "oidc-provider" / "package.json").exists():
            return
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(
                "the OIDC tests need Node.js 20 and npm (apt-get install nodejs npm)"
            )
        subprocess.run(
            [npm, "ci", "--prefer-offline", "--no-audit", "--no-fund"],
            cwd=HERE, check=True, timeout=600, capture_output=True,
        )  # fmt: skip


def client(redirect: str = "http://127.0.0.1/callback") -> dict[str, Any]:
    return {
        "client_id": CLIENT_ID,
        "application_type": "native",
        "token_endpoint_auth_method": "none",
        "redirect_uris": [redirect],
        "grant_types": ["authorization_code", "urn:ietf:params:oauth:grant-type:device_code"],
        "response_types": ["code"],
    }


@dataclass
class Provider:
    """One provider process; `accounts` can be changed and `save()`d between sign-ins."""

    directory: Path
    accounts: dict[str, dict[str, Any]]
    clients: list[dict[str, Any]] = field(default_factory=lambda: [client()])
    port: int = 0
    issuer: str = ""
    _process: subprocess.Popen[str] | None = None
    _keys: dict[str, Any] = field(default_factory=dict)

    def start(self, *, new_keys: bool = False) -> Provider:
        install()
        if new_keys or not self._keys:
            self._keys = dict(KeySet.generate_key_set("RSA", 2048, count=1).as_dict(private=True))
        self.save()
        node = shutil.which("node")
        assert node is not None
        self._process = subprocess.Popen(
            [node, str(HERE / "provider.mjs"), str(self.directory / "provider.json")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "NODE_ENV": "test"},
        )  # fmt: skip
        assert self._process.stdout is not None
        line = self._process.stdout.readline()  # the provider prints READY first, or dies
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"the OIDC provider did not start: {line!r}")
        self.issuer = line.split()[1]
        self.port = int(self.issuer.rsplit(":", 1)[1])
        return self

    def save(self) -> None:
        config = {
            "port": self.port,
            "clients": self.clients,
            "accounts": self.accounts,
            "jwks": {"keys": self._keys.get("keys", [])},
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "provider.json").write_text(json.dumps(config))

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


_FORM = re.compile(r"<form[^>]*action=\"([^\"]+)\"[^>]*>(.*?)</form>", re.S)
_INPUT = re.compile(r"<input([^>]*)>")
_ATTR = re.compile(r"(\w+)=\"([^\"]*)\"")


async def sign_in_at(http: httpx.AsyncClient, url: str, login: str, stop_at: str) -> str:
    """A person in a browser: open `url`, fill the provider's login form as `login`, confirm
    consent, and follow redirects until one leads to `stop_at`; returns that URL."""
    for _ in range(20):
        if url.startswith(stop_at):
            return url
        response = await http.get(url)
        while response.is_redirect:
            url = urljoin(str(response.url), response.headers["location"])
            if url.startswith(stop_at):
                return url
            response = await http.get(url)
        match = _FORM.search(response.text)
        if match is None:
            raise AssertionError(f"no form on the provider's page: {response.text[:300]}")
        action, body = urljoin(str(response.url), html.unescape(match.group(1))), match.group(2)
        fields: dict[str, str] = {}
        for tag in _INPUT.findall(body):
            attrs = dict(_ATTR.findall(tag))
            if "name" in attrs:
                fields[attrs["name"]] = html.unescape(attrs.get("value", ""))
        if "login" in fields:
            fields["login"] = login
            fields["password"] = "any"  # the dev login form takes any password
        response = await http.post(action, data=fields)
        if not response.is_redirect:
            raise AssertionError(f"the provider refused the form: {response.text[:300]}")
        url = urljoin(str(response.url), response.headers["location"])
    raise AssertionError("sign-in did not finish")


async def id_token_for(
    provider: Provider, login: str, *, nonce: str, redirect: str = "http://127.0.0.1/callback"
) -> str:
    """An ID token for `login`, through the authorization code flow with PKCE."""
    verifier, challenge = pkce()
    state = secrets.token_urlsafe(16)
    query = {
        "client_id": CLIENT_ID, "response_type": "code", "scope": "openid profile email",
        "redirect_uri": redirect, "code_challenge": challenge, "code_challenge_method": "S256",
        "nonce": nonce, "state": state,
    }  # fmt: skip
    async with httpx.AsyncClient(timeout=10.0) as http:
        done = await sign_in_at(http, f"{provider.issuer}/auth?{urlencode(query)}", login, redirect)
        params = parse_qs(urlparse(done).query)
        assert params["state"] == [state], params
        response = await http.post(
            f"{provider.issuer}/token",
            data={
                "grant_type": "authorization_code", "code": params["code"][0],
                "redirect_uri": redirect, "client_id": CLIENT_ID, "code_verifier": verifier,
            },
        )  # fmt: skip
        response.raise_for_status()
        return str(response.json()["id_token"])
