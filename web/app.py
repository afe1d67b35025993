"""The web page: Starlette routes rendering Jinja2 templates, every action through the SDK with
the signed-in person's own token.

Security: sessions live server-side (the cookie is a random id: Secure, HttpOnly,
SameSite=Strict); every POST carries the session's CSRF token and, when the browser sends one,
an Origin equal to ours; a strict Content-Security-Policy (scripts and styles from this origin
only, no inline code, no framing); no form field ever names the person acting: the coordinator
sees only the session's token, so nobody can act as someone else by editing a form."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlparse

import grpc
import httpx
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from jitmesh import errors
from jitmesh.client import Client
from jitmesh.durations import DurationError, format_duration, parse_duration
from jitmesh.types import GrantState, RequestOption, RequestState
from jitmesh.types import Request as AccessRequest

from . import signin
from .sessions import Session, Sessions

HERE = Path(__file__).parent
SESSION_COOKIE = "jm_session"
SIGNIN_COOKIE = "jm_signin"  # the pre-session CSRF token of the sign-in form
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
LIVE_GRANT_STATES = (GrantState.PENDING_DELIVERY, GrantState.ACTIVE, GrantState.REVOKING)
# The durations offered when asking (up to the longest the person may ask for), and the
# extensions offered on a live grant (the coordinator bounds both by the rule).
DURATIONS = tuple(timedelta(minutes=m) for m in (15, 30, 60, 120, 240, 480, 1440))
EXTENSIONS = (timedelta(minutes=15), timedelta(minutes=30), timedelta(hours=1))
# The coordinator could not be reached (restarting, or the network): a 503, never a 500.
UNREACHABLE = (errors.UnavailableError, errors.DeadlineExceededError)


@dataclass(frozen=True, slots=True)
class WebSettings:
    coordinator: str
    public_url: str
    # Development: sign in by pasting a jitmesh token (off in production: use single sign-on).
    token_sign_in: bool = False
    credentials: grpc.ChannelCredentials | None = None
    secure_cookies: bool = True
    session_idle: timedelta = timedelta(hours=8)

    @property
    def origin(self) -> str:
        parsed = urlparse(self.public_url)
        return f"{parsed.scheme}://{parsed.netloc}"


class SecurityHeaders(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        # A page may set its own (the sign-in page adds the identity provider to form-action).
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Cache-Control"] = "no-store"
        return response


class Forbidden(Exception):
    pass


Handler = Callable[[Request, Session], Awaitable[Response]]


def create_app(settings: WebSettings) -> Starlette:
    sessions = Sessions(settings.session_idle.total_seconds())
    # Signs the sign-in binding cookies; per process, like the sessions themselves.
    cookie_key = secrets.token_bytes(32)
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        enable_async=False,
    )
    env.filters["ago"] = _ago
    env.filters["duration"] = format_duration
    env.filters["state"] = lambda s: getattr(s, "value", s or "")

    def render(
        request: Request, name: str, session: Session | None, status: int = 200, **context: Any
    ) -> HTMLResponse:
        flashes = list(session.flashes) if session else []
        if session:
            session.flashes.clear()
        html = env.get_template(name).render(
            session=session, flashes=flashes, path=request.url.path, **context
        )
        return HTMLResponse(html, status_code=status)

    async def client_for(session: Session) -> Client:
        if session.client is None:
            session.client = await Client.connect(
                settings.coordinator, token=session.token, credentials=settings.credentials
            )
        return session.client

    def set_session_cookie(response: Response, session: Session) -> None:
        response.set_cookie(
            SESSION_COOKIE, session.id, httponly=True, secure=settings.secure_cookies,
            samesite="strict", path="/",
            max_age=int(session.expires_at - time.monotonic()),
        )  # fmt: skip

    def unavailable(request: Request, session: Session | None) -> Response:
        message = "jitmesh cannot reach the coordinator right now. Nothing was lost: "
        if request.method == "GET":
            message += "reload this page in a moment."
        else:
            message += "open the page again in a moment to see whether your action was done."
        response = render(request, "error.html", session, 503, message=message)
        response.headers["Retry-After"] = "5"
        return response

    def origin_ok(request: Request) -> bool:
        origin = request.headers.get("origin")
        return origin is None or origin == settings.origin

    def page(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            session = sessions.get(request.cookies.get(SESSION_COOKIE))
            if session is None:
                if request.method == "GET" and not request.url.path.endswith("/live"):
                    return RedirectResponse(f"/signin?{urlencode({'next': request.url.path})}", 303)
                return PlainTextResponse("sign in first", status_code=401)
            if request.method == "POST":
                form = await request.form()
                if not origin_ok(request) or not session.csrf_ok(str(form.get("csrf", ""))):
                    return render(
                        request, "error.html", session, 403,
                        message="This form has expired or did not come from this page. "
                        "Go back, reload, and try again.",
                    )  # fmt: skip
            try:
                return await handler(request, session)
            except errors.AuthenticationError:
                await sessions.end(session.id)
                return RedirectResponse("/signin", 303)
            except UNREACHABLE:
                # The coordinator is restarting or cannot be reached. A gRPC channel whose
                # connect failed waits longer and longer (up to two minutes) before it tries
                # again: drop it, so the next page connects at once. The session stays: its
                # token is the coordinator's, kept in its store.
                await session.drop_client()
                return unavailable(request, session)

        return wrapped

    # Sign-in.

    async def signin_page(request: Request) -> Response:
        sso = await _sign_in_config(settings)
        token = secrets.token_urlsafe(24)
        response = render(
            request, "signin.html", None, sso=sso is not None,
            token_sign_in=settings.token_sign_in, csrf=token,
            next=_safe_next(request.query_params.get("next", "/")),
            error=request.query_params.get("error", ""),
        )  # fmt: skip
        response.set_cookie(
            SIGNIN_COOKIE, token, httponly=True, secure=settings.secure_cookies,
            samesite="strict", path="/signin", max_age=900,
        )  # fmt: skip
        if sso is not None:
            # The single sign-on form's answer redirects to the identity provider, and browsers
            # apply form-action to a form's redirects too: allow that one origin, on this page.
            response.headers["Content-Security-Policy"] = CSP.replace(
                "form-action 'self'", f"form-action 'self' {_origin(sso.issuer)}"
            )
        return response

    def signin_form_ok(request: Request, form: FormData) -> bool:
        expected = request.cookies.get(SIGNIN_COOKIE, "")
        given = str(form.get("csrf", ""))
        return origin_ok(request) and bool(expected) and secrets.compare_digest(expected, given)

    async def signin_token(request: Request) -> Response:
        form = await request.form()
        if not settings.token_sign_in:
            return PlainTextResponse("token sign-in is off", status_code=404)
        if not signin_form_ok(request, form):
            return RedirectResponse("/signin?error=expired", 303)
        token = str(form.get("token", "")).strip()
        return await _start_session(request, token, None, str(form.get("next", "/")))

    async def _start_session(
        request: Request,
        token: str,
        expires_at: datetime | None,
        next_path: str,
        *,
        interstitial: bool = False,
    ) -> Response:
        try:
            async with await Client.connect(
                settings.coordinator, token=token, credentials=settings.credentials
            ) as client:
                me = await client.whoami()
        except (
            errors.AuthenticationError,
            errors.PermissionDeniedError,
            errors.InvalidArgumentError,
        ):
            # PermissionDenied: a scoped token (a bridge's), which acts for no person here.
            return RedirectResponse("/signin?error=token", 303)
        except UNREACHABLE:
            return unavailable(request, None)
        lifetime = settings.session_idle.total_seconds()
        if expires_at is not None:
            lifetime = max(0.0, (expires_at - datetime.now(UTC)).total_seconds())
        session = sessions.create(token, me.name, me.groups, lifetime)
        response: Response = RedirectResponse(_safe_next(next_path), 303)
        if interstitial:
            # The identity provider's redirect is a cross-site navigation: a redirect from it
            # would not carry the new SameSite=Strict session cookie, so this page moves on by
            # itself (a same-site navigation) instead.
            response = render(
                request, "signed_in.html", None, next=_safe_next(next_path), user=me.name
            )
        set_session_cookie(response, session)
        response.delete_cookie(SIGNIN_COOKIE, path="/signin")
        return response

    async def signin_sso(request: Request) -> Response:
        form = await request.form()
        if not signin_form_ok(request, form):
            return RedirectResponse("/signin?error=expired", 303)
        sso = await _sign_in_config(settings)
        if sso is None:
            return RedirectResponse("/signin?error=sso", 303)
        discovery = await _discover(sso.issuer)
        verifier, challenge = signin.pkce_pair()
        binding = signin.Binding.new(time.time())
        sessions.begin_sign_in(
            binding.state, binding.nonce, verifier, _safe_next(str(form.get("next", "/"))),
            signin.LIFETIME,
        )  # fmt: skip
        query = {
            "client_id": sso.client_id, "response_type": "code",
            "scope": " ".join(sso.scopes), "redirect_uri": _callback(settings),
            "code_challenge": challenge, "code_challenge_method": "S256",
            "state": binding.state, "nonce": binding.nonce,
        }  # fmt: skip
        response = RedirectResponse(
            f"{discovery['authorization_endpoint']}?{urlencode(query)}", 303
        )
        response.set_cookie(
            signin.COOKIE, signin.seal(cookie_key, binding), httponly=True,
            secure=settings.secure_cookies, samesite="lax", path=signin.COOKIE_PATH,
            max_age=int(signin.LIFETIME),
        )  # fmt: skip
        return response

    def refused(request: Request, message: str, *, spent: bool = True) -> Response:
        """A sign-in that does not finish. `spent`: it was this browser's own sign-in, whose
        binding is then cleared; a foreign callback leaves the browser's own sign-in in flight
        (else anyone could cancel it by sending a link)."""
        response = render(request, "error.html", None, 400, message=message, retry=True)
        if spent:
            response.delete_cookie(signin.COOKIE, path=signin.COOKIE_PATH)
        return response

    async def signin_callback(request: Request) -> Response:
        state = request.query_params.get("state", "")
        binding = signin.unseal(cookie_key, request.cookies.get(signin.COOKIE), time.time())
        if binding is None or not binding.matches(state):
            # Login CSRF: a callback address made for another browser (or forged, replayed,
            # or older than ten minutes) never signs anyone in here.
            return refused(
                request,
                "This sign-in did not start in this browser (or took too long). "
                "Sign in again from this page.",
                spent=binding is None,
            )
        pending = sessions.finish_sign_in(state)
        code = request.query_params.get("code", "")
        if (
            pending is None
            or not code
            or not secrets.compare_digest(pending.nonce.encode(), binding.nonce.encode())
        ):
            return refused(request, "Sign-in did not finish. Sign in again from this page.")
        sso = await _sign_in_config(settings)
        if sso is None:
            return refused(request, "Single sign-on is not available now.")
        discovery = await _discover(sso.issuer)
        async with httpx.AsyncClient(timeout=10.0) as http:
            answer = await http.post(
                discovery["token_endpoint"],
                data={
                    "grant_type": "authorization_code", "code": code,
                    "redirect_uri": _callback(settings), "client_id": sso.client_id,
                    "code_verifier": pending.verifier,
                },
            )  # fmt: skip
        if not answer.is_success or "id_token" not in answer.json():
            return refused(request, "The identity provider did not complete the sign-in.")
        try:
            async with await Client.connect(
                settings.coordinator, credentials=settings.credentials
            ) as anonymous:
                # The coordinator checks the ID token, its nonce against this browser's.
                token, info = await anonymous.exchange_id_token(
                    answer.json()["id_token"], nonce=binding.nonce
                )
        except UNREACHABLE:
            return unavailable(request, None)
        except errors.JitmeshError:
            return refused(request, "The coordinator refused this sign-in.")
        response = await _start_session(
            request, token, info.expires_at, pending.next_path, interstitial=True
        )
        response.delete_cookie(signin.COOKIE, path=signin.COOKIE_PATH)
        return response

    async def signout(request: Request) -> Response:
        session = sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is not None:
            form = await request.form()
            if session.csrf_ok(str(form.get("csrf", ""))) and origin_ok(request):
                await sessions.end(session.id)
        response = RedirectResponse("/signin", 303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # Pages.

    async def home(request: Request, session: Session) -> Response:
        client = await client_for(session)
        mine = await client.list_requests(subject=session.user, limit=20)
        pending = await client.list_requests(states=[RequestState.PENDING], limit=200)
        to_review = [r for r in pending if r.subject != session.user and _may_review(r, session)]
        grants = await client.list_grants(subject=session.user, states=LIVE_GRANT_STATES, limit=50)
        return render(
            request, "home.html", session, mine=mine, to_review=to_review, grants=grants,
            now=datetime.now(UTC), extensions=EXTENSIONS,
        )  # fmt: skip

    async def new_request(request: Request, session: Session) -> Response:
        client = await client_for(session)
        return await request_form(request, session, client, {}, "", 200)

    async def request_form(
        request: Request,
        session: Session,
        client: Client,
        values: dict[str, str],
        error: str,
        status: int,
    ) -> Response:
        # Only what the coordinator says this person may ask for now ("what may I ask for"):
        # each host and action with its longest duration and the approval it would need.
        offered = await client.request_options()
        longest = max((o.max_duration for o in offered), default=timedelta(0))
        return render(
            request, "new_request.html", session, status, options=offered,
            durations=[d for d in DURATIONS if d <= longest], form=values, error=error,
            approval=_approval,
        )  # fmt: skip

    async def file_request(request: Request, session: Session) -> Response:
        client = await client_for(session)
        form = await request.form()
        values = {k: str(form.get(k, "")).strip() for k in ("option", "duration", "reason")}
        agent, _, action = values["option"].partition(" ")
        try:
            duration = parse_duration(values["duration"] or "15m")
            # Checked here only to say it plainly; the coordinator decides either way.
            offered = (
                await client.request_options(agent=agent, action=action) if agent and action else []
            )
            option = next((o for o in offered if (o.agent, o.action) == (agent, action)), None)
            if option is None:
                raise errors.PermissionDeniedError(f"you may not ask for {action} on {agent}")
            if duration > option.max_duration:
                raise errors.InvalidArgumentError(
                    f"{action} on {agent} is given for at most "
                    f"{format_duration(option.max_duration)}"
                )
            created, _ = await client.create_request(
                agent=agent, action=action, duration=duration, reason=values["reason"]
            )
        except UNREACHABLE:
            # The 503 page (page()): filed or not is unknown, and filing again from the form
            # could make a second request.
            raise
        except (errors.JitmeshError, DurationError) as exc:
            return await request_form(request, session, client, values, str(exc), 400)
        session.flashes.append(("ok", f"Request {created.id} filed."))
        return RedirectResponse(f"/requests/{created.id}", 303)

    async def show_request(request: Request, session: Session) -> Response:
        client = await client_for(session)
        request_id = request.path_params["request_id"]
        try:
            found = await client.get_request(request_id)
        except (errors.NotFoundError, errors.InvalidArgumentError):
            return render(request, "error.html", session, 404, message="No such request.")
        history = [
            r for r in await client.list_requests(subject=found.subject, limit=11)
            if r.id != found.id
        ][:10]  # fmt: skip
        grant = await client.get_grant(found.grant_id) if found.grant_id else None
        return render(
            request, "request.html", session, r=found, grant=grant, history=history,
            may_review=_may_review(found, session) and found.subject != session.user,
            now=datetime.now(UTC),
        )  # fmt: skip

    async def live_request(request: Request, session: Session) -> Response:
        client = await client_for(session)
        found = await client.get_request(request.path_params["request_id"])
        grant = await client.get_grant(found.grant_id) if found.grant_id else None
        return render(request, "_live.html", session, r=found, grant=grant, now=datetime.now(UTC))

    async def review(request: Request, session: Session) -> Response:
        client = await client_for(session)
        request_id = request.path_params["request_id"]
        form = await request.form()
        decision = str(form.get("decision", ""))
        reason = str(form.get("reason", "")).strip()
        try:
            if decision == "approve":
                await client.approve(request_id, reason=reason)
                session.flashes.append(("ok", "Approved."))
            elif decision == "deny":
                await client.deny(request_id, reason=reason)
                session.flashes.append(("ok", "Denied."))
            else:
                session.flashes.append(("error", "Choose approve or deny."))
        except UNREACHABLE:
            raise  # the 503 page (page()): whether it was done is not known
        except errors.JitmeshError as exc:
            session.flashes.append(("error", f"Not done: {exc}"))
        return RedirectResponse(f"/requests/{request_id}", 303)

    async def cancel(request: Request, session: Session) -> Response:
        client = await client_for(session)
        request_id = request.path_params["request_id"]
        try:
            await client.cancel(request_id)
            session.flashes.append(("ok", "Cancelled."))
        except UNREACHABLE:
            raise  # the 503 page (page()): whether it was done is not known
        except errors.JitmeshError as exc:
            session.flashes.append(("error", f"Not done: {exc}"))
        return RedirectResponse(f"/requests/{request_id}", 303)

    async def release(request: Request, session: Session) -> Response:
        client = await client_for(session)
        grant_id = request.path_params["grant_id"]
        try:
            await client.release_grant(grant_id)
            session.flashes.append(("ok", "Released: the host removes it now."))
        except UNREACHABLE:
            raise  # the 503 page (page()): whether it was done is not known
        except errors.JitmeshError as exc:
            session.flashes.append(("error", f"Not done: {exc}"))
        return RedirectResponse("/", 303)

    async def extend(request: Request, session: Session) -> Response:
        client = await client_for(session)
        grant_id = request.path_params["grant_id"]
        form = await request.form()
        try:
            by = parse_duration(str(form.get("by", "")) or "15m")
            if by not in EXTENSIONS:
                raise errors.InvalidArgumentError("choose one of the offered extensions")
            extended = await client.extend_grant(grant_id, by=by)
            if extended.request is not None:
                session.flashes.append(
                    ("ok", f"Extension asked for: request {extended.request.id} needs approval.")
                )
            else:
                ends = _ago(extended.grant.not_after)
                session.flashes.append(("ok", f"Extended by {format_duration(by)}: ends {ends}."))
        except UNREACHABLE:
            raise  # the 503 page (page()): whether it was done is not known
        except (errors.JitmeshError, DurationError) as exc:
            session.flashes.append(("error", f"Not done: {exc}"))
        return RedirectResponse("/", 303)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await sessions.close()

    routes = [
        Route("/healthz", healthz),
        Route("/signin", signin_page),
        Route("/signin/token", signin_token, methods=["POST"]),
        Route("/signin/sso", signin_sso, methods=["POST"]),
        Route("/signin/callback", signin_callback),
        Route("/signout", signout, methods=["POST"]),
        Route("/", page(home)),
        Route("/requests/new", page(new_request)),
        Route("/requests", page(file_request), methods=["POST"]),
        Route("/requests/{request_id}", page(show_request)),
        Route("/requests/{request_id}/live", page(live_request)),
        Route("/requests/{request_id}/review", page(review), methods=["POST"]),
        Route("/requests/{request_id}/cancel", page(cancel), methods=["POST"]),
        Route("/grants/{grant_id}/release", page(release), methods=["POST"]),
        Route("/grants/{grant_id}/extend", page(extend), methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)], lifespan=lifespan)
    app.state.sessions = sessions
    return app


async def _sign_in_config(settings: WebSettings) -> Any:
    try:
        async with await Client.connect(
            settings.coordinator, credentials=settings.credentials
        ) as anonymous:
            return await anonymous.sign_in_config()
    except errors.JitmeshError:
        return None


async def _discover(issuer: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10.0) as http:
        response = await http.get(issuer.rstrip("/") + "/.well-known/openid-configuration")
        response.raise_for_status()
        document: dict[str, Any] = response.json()
        return document


def _origin(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError("the identity provider's issuer is not an http(s) URL")
    return f"{parsed.scheme}://{parsed.netloc}"


def _callback(settings: WebSettings) -> str:
    return settings.public_url.rstrip("/") + "/signin/callback"


def _safe_next(value: str) -> str:
    r"""Only a path on this site, as a browser reads it: never "//evil.example" or "https://...",
    nor what a browser turns into "//evil.example" ("/\evil.example": a backslash is a slash in
    http(s) addresses; "/<TAB>/evil.example": tabs and newlines are dropped). The signed-in
    page follows it by a meta refresh and a link, where nothing escapes it (a redirect's
    Location does)."""
    if (
        not value.startswith("/")
        or value.startswith("//")
        or "\\" in value
        or any(ord(char) < 0x20 or ord(char) == 0x7F for char in value)
    ):
        return "/"
    return value


def _may_review(r: AccessRequest, session: Session) -> bool:
    """Whether to offer Approve/Deny (the coordinator decides; this only hides useless
    buttons)."""
    if r.state is not RequestState.PENDING:
        return False
    groups = set(session.groups)
    if r.stages:
        return any(groups & set(s.groups) or session.user in s.users for s in r.stages)
    return bool(groups & set(r.approver_groups))


def _approval(option: RequestOption) -> str:
    """How a request for `option` would be approved, in a few words."""
    plan = option.plan
    if plan.automatic:
        return "approved at once"
    who = [" or ".join([*s.groups, *s.users]) or s.name for s in plan.stages]
    return f"needs approval: {', then '.join(who)}" if who else "needs approval"


def _ago(at: datetime | None, now: datetime | None = None) -> str:
    if at is None:
        return ""
    now = now or datetime.now(UTC)
    delta = now - at
    future = delta.total_seconds() < 0
    seconds = int(abs(delta.total_seconds()))
    text = format_duration(timedelta(seconds=max(seconds, 1)))
    return f"in {text}" if future else f"{text} ago"
