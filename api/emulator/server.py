"""The ASGI app: both embedding APIs at the provider's paths, plus the control endpoints.

Per embedding request, in this order:

    auth (401) -> JSON body (400) -> model served in the region (404) -> input and parameters
    (400) -> rate windows (429) -> injected faults (429, 500/503) -> moderation marker (400)
    -> vectors, bill, optional truncated body -> latency / hang sleep -> answer

Only requests answered with vectors are charged (a truncated 200 is charged too, as the provider
charged work the client could not read). Every request is logged.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.emulator import errors
from api.emulator.answers import answer_body
from api.emulator.batch_routes import batch_routes
from api.emulator.config import EmulatorConfig
from api.emulator.control import bearer, control_routes
from api.emulator.parsing import EmbedCall, describe, parse
from api.emulator.state import EmulatorState
from worker import tokens
from worker.catalog import COMPATIBLE_PATH, NATIVE_PATH


def create_app(config: EmulatorConfig, control_token: str | None = None) -> Starlette:
    """The ASGI app serving both embedding APIs and the `/_emulator/` control endpoints. The
    tokenizer is loaded now: the first call would otherwise wait ~0.5 s for it, which no
    provider does."""
    tokens.encoding()
    state = EmulatorState(config)

    async def compatible(request: Request) -> Response:
        return await embed(state, request, "compatible")

    async def native(request: Request) -> Response:
        return await embed(state, request, "native")

    return Starlette(
        routes=[
            Route(COMPATIBLE_PATH, compatible, methods=["POST"]),
            Route(NATIVE_PATH, native, methods=["POST"]),
            *batch_routes(state),
            *control_routes(state, control_token),
        ]
    )


async def embed(state: EmulatorState, request: Request, api: str) -> Response:
    """Answer one embedding request of `api` ("native" or "compatible") and log it."""
    request_id = str(uuid.uuid4())
    cfg = state.config
    entry = _log_entry(request_id, api)
    hang = truncate = False
    try:
        body = await _authorized_body(request, cfg)
        entry["model"], entry["rows"] = describe(api, body)
        call = parse(api, body, cfg)
        _raise_refusals(state, cfg, call)
        hang, truncate = state.draw(cfg.hang_rate), state.draw(cfg.truncate_rate)
        answer, status = answer_body(api, call, request_id), 200
        entry["tokens"] = call.tokens
    except errors.ProviderError as exc:
        answer, status = exc.body(api, request_id), exc.status
        entry["code"] = exc.code_in(api)
    entry["status"] = status
    state.record(entry, charged=status == 200)
    delay_s = cfg.latency_ms / 1000 + (cfg.hang_s if hang else 0.0)
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    return _json(answer, status, request_id, truncate=truncate)


def _log_entry(request_id: str, api: str) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "api": api,
        "model": None,
        "status": 200,
        "code": None,
        "rows": 0,
        "tokens": 0,
        "at": time.time(),
    }


async def _authorized_body(request: Request, cfg: EmulatorConfig) -> dict[str, Any]:
    """The JSON object body of a request carrying an accepted API key."""
    if bearer(request) not in cfg.api_keys:
        raise errors.unauthorized()
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise errors.invalid("The request body is not valid JSON.", errors.ILLEGAL_INPUT) from None
    if not isinstance(body, dict):
        raise errors.invalid("The request body must be a JSON object.", errors.ILLEGAL_INPUT)
    return body


def _raise_refusals(state: EmulatorState, cfg: EmulatorConfig, call: EmbedCall) -> None:
    """Rate windows, then injected throttling and errors, then the moderation marker."""
    throttled = state.admit(call.spec.name, call.tokens)
    if throttled:
        raise throttled
    if state.draw(cfg.throttle_rate):
        raise state.choice([errors.rate_quota, errors.allocation_quota, errors.burst_rate])
    if state.draw(cfg.error_rate):
        raise state.choice([errors.internal, errors.unavailable])
    if any(cfg.inspection_marker in t for t in call.texts):
        raise errors.inspection_failed()


def _json(body: dict[str, Any], status: int, request_id: str, *, truncate: bool = False) -> Response:
    try:  # orjson: a batch of vectors is most of the emulator's own CPU (it shares the machine)
        content = orjson.dumps(body)
    except TypeError:  # a value orjson does not take (an integer over 64 bits)
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    if truncate:
        content = content[: len(content) // 2]
    return Response(content, status, {"x-request-id": request_id}, media_type="application/json")
