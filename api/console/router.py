"""GET /console (the pages), GET /console/static/{name}, and sign-in at /console/session.

    GET    /console                 the single page (its views: #overview, #spend, #budgets,
                                    #sources, #deadletters, #ledger, #search)
    GET    /console/static/{name}   console.css, console.js (from this package, never a CDN)
    POST   /console/session         {"token": "…"} → sets the cookie; {"role", "csrf"}
    GET    /console/session         the signed-in role and CSRF value, or 401
    DELETE /console/session         signs out (clears the cookie)

Every page answer carries a Content-Security-Policy allowing only this origin's scripts, styles and
connections, no framing, and no inline script.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from api import deps
from api.auth import role_of
from api.console import session

router = APIRouter(include_in_schema=False)

STATIC = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class SignIn(BaseModel):
    token: str = Field(min_length=1, max_length=512)


def asset(name: str) -> bytes:
    return resources.files("api.console").joinpath("static", name).read_bytes()


@router.get("/console")
@router.get("/console/")
def page() -> Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-store"}
    return Response(asset("index.html"), media_type="text/html; charset=utf-8", headers=headers)


@router.get("/console/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC:
        raise HTTPException(404, "no such console file")
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
    return Response(asset(name), media_type=STATIC[name], headers=headers)


@router.post("/console/session")
def sign_in(request: Request, body: SignIn) -> JSONResponse:
    """Sign in with a read or write token. JSON only (FastAPI parses a body model from JSON, and a
    cross-site form cannot send `application/json`)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, "send the token as application/json")
    role = role_of(deps.settings(request), body.token) if session.usable(body.token) else None
    if role is None:
        raise HTTPException(401, "not a token this API accepts")
    answer = JSONResponse({"role": role, "csrf": session.csrf_for(body.token)}, headers=SECURITY_HEADERS)
    answer.set_cookie(
        session.COOKIE,
        session.cookie_value(body.token),
        max_age=session.MAX_AGE_S,
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return answer


@router.get("/console/session")
def who(request: Request) -> JSONResponse:
    token = session.token_of(request.headers.get("cookie", ""))
    role = None if token is None else role_of(deps.settings(request), token)
    if token is None or role is None:
        raise HTTPException(401, "not signed in")
    return JSONResponse({"role": role, "csrf": session.csrf_for(token)}, headers=SECURITY_HEADERS)


@router.delete("/console/session")
def sign_out() -> Response:
    answer = Response(status_code=204, headers=SECURITY_HEADERS)
    answer.delete_cookie(session.COOKIE, path="/", httponly=True, samesite="strict")
    return answer
