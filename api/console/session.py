"""The console's sign-in: the token lives in a cookie the page's script cannot read.

Signing in (POST /console/session, JSON only) checks the token like a bearer header would and sets
`sidecar_console` (HttpOnly, SameSite=Strict, Secure over https, 12 hours). `ConsoleCookieAuth`
then turns that cookie into `Authorization: Bearer …` on the JSON routes (/v1/*, /metrics,
/readyz) when a request carries no Authorization header of its own, so the console reads and
writes through the very routes every other client uses, with the same token roles (a read token
sees, a write token may also retry a dead letter or change a cap).

Cross-site requests: the browser never sends a SameSite=Strict cookie from another site; on top of
that, a write carried by the cookie must send `X-CSRF-Token` — an HMAC of the token, which only a
page that read GET /console/session can know (CORS keeps other origins from reading it) — and, when
the browser names an Origin, it must be this host. Sign-in accepts only `application/json`, which a
plain cross-site form cannot send.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from fastapi.responses import JSONResponse
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE = "sidecar_console"
CSRF_HEADER = "x-csrf-token"
MAX_AGE_S = 12 * 3600
GUARDED = ("/v1/", "/metrics", "/readyz")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def csrf_for(token: str) -> str:
    """The CSRF value for a session: an HMAC keyed by the token (stateless, unguessable without it)."""
    return hmac.new(token.encode(), b"sidecar-console-csrf", hashlib.sha256).hexdigest()


def cookie_value(token: str) -> str:
    """The token as a cookie value (base64url: tokens may hold characters a cookie cannot)."""
    return base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


def token_of(cookie_header: str) -> str | None:
    """The token in a Cookie header, or None when there is none (or it is not one we set)."""
    raw = cookie_parser(cookie_header).get(COOKIE)
    if not raw or len(raw) > 2048:
        return None
    try:
        token = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    except (binascii.Error, ValueError):
        return None
    return token if usable(token) else None


def usable(token: str) -> bool:
    """A token a bearer header could carry too: printable, and latin-1 (what HTTP headers hold)."""
    try:
        token.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return bool(token) and token.isprintable()


class ConsoleCookieAuth:
    """ASGI middleware: the console cookie as a bearer token on the JSON routes (see the module)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(GUARDED):
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope["headers"]}
        token = None
        if b"authorization" not in headers and b"cookie" in headers:
            token = token_of(headers[b"cookie"].decode("latin-1"))
        if token is None:
            await self.app(scope, receive, send)
            return
        problem = None if scope["method"] in SAFE_METHODS else write_problem(headers, token)
        if problem is not None:
            await JSONResponse({"detail": problem}, 403)(scope, receive, send)
            return
        bearer = (b"authorization", f"Bearer {token}".encode("latin-1"))
        await self.app({**scope, "headers": [*scope["headers"], bearer]}, receive, send)


def write_problem(headers: dict[bytes, bytes], token: str) -> str | None:
    """Why a write carried by the cookie is refused, or None when it may go on."""
    given = headers.get(CSRF_HEADER.encode(), b"").decode("latin-1")
    if not hmac.compare_digest(given.encode(), csrf_for(token).encode()):
        return f"a write signed in by the console cookie needs the {CSRF_HEADER} header of its session"
    origin = headers.get(b"origin")
    if origin is not None and origin.split(b"://", 1)[-1] != headers.get(b"host", b""):
        return "a write signed in by the console cookie must come from this host's pages"
    return None
