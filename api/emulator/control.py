"""The control endpoints under `/_emulator/` and the token that guards them.

`GET bill` (every charged request; `at` is unix seconds, a float), `GET log` (every request
received), `GET|POST config` (POST a JSON patch applied live; 422 names a bad field; API keys are
masked in the answer) and `POST reset`. With a control token, each needs `Authorization: Bearer
<token>` (401 otherwise). Without one they are open, which `check_exposure` allows only on loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.emulator.config import ConfigFieldError
from api.emulator.state import EmulatorState

Endpoint = Callable[[Request], Awaitable[Response]]


class ExposureError(ValueError):
    """The emulator would serve unguarded control endpoints beyond loopback."""


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def check_exposure(host: str, control_token: str | None) -> None:
    """Refuse (ExposureError) to listen beyond loopback without a control token."""
    if not control_token and not is_loopback(host):
        raise ExposureError(
            f"refusing to listen on {host}, which is not a loopback address, without a control "
            "token: anyone who can reach it could reconfigure the emulator or read its log; set "
            "--control-token or SIDECAR_EMULATOR_CONTROL_TOKEN, or listen on 127.0.0.1"
        )


def bearer(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if there is one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def control_routes(state: EmulatorState, control_token: str | None) -> list[Route]:
    """The `/_emulator/` routes, each behind the token when one is set."""

    def guarded(endpoint: Endpoint) -> Endpoint:
        return endpoint if not control_token else _require_token(endpoint, control_token)

    async def bill(request: Request) -> Response:
        return JSONResponse(state.bill_snapshot())

    async def log(request: Request) -> Response:
        return JSONResponse(state.log_snapshot())

    async def config(request: Request) -> Response:
        return await _config(state, request)

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse({"reset": True})

    return [
        Route("/_emulator/bill", guarded(bill), methods=["GET"]),
        Route("/_emulator/log", guarded(log), methods=["GET"]),
        Route("/_emulator/config", guarded(config), methods=["GET", "POST"]),
        Route("/_emulator/reset", guarded(reset), methods=["POST"]),
    ]


def _require_token(endpoint: Endpoint, control_token: str) -> Endpoint:
    expected = control_token.encode()

    async def checked(request: Request) -> Response:
        given = (bearer(request) or "").encode()
        if not hmac.compare_digest(given, expected):
            return JSONResponse(
                {"error": "the control endpoints need Authorization: Bearer <control token>"},
                401,
                {"WWW-Authenticate": "Bearer"},
            )
        return await endpoint(request)

    return checked


async def _config(state: EmulatorState, request: Request) -> Response:
    """GET: the live config; POST: apply a JSON patch first (400 bad JSON, 422 bad field)."""
    if request.method == "POST":
        try:
            patch = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": "the body is not valid JSON"}, 400)
        if not isinstance(patch, dict):
            return JSONResponse({"error": "the body must be a JSON object of config fields"}, 422)
        try:
            state.patch_config(patch)
        except ConfigFieldError as exc:
            return JSONResponse({"error": str(exc), "field": exc.field, "rule": exc.rule}, 422)
    return JSONResponse(state.config.public())
