"""The Batch File API's HTTP routes under `/compatible-mode/v1`, as the official `openai` client
calls them: `POST /files` (multipart, purpose=batch), `GET /files/{id}`, `GET /files/{id}/content`,
`POST /batches`, `GET /batches/{id}`, `GET /batches` (`after`, `limit` 1–100, `ds_name`),
`POST /batches/{id}/cancel`. State and life cycle: api/emulator/batch.py.

The multipart body is read with the standard library's MIME parser (no extra package).
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.emulator import errors
from api.emulator.batch_input import BatchError
from api.emulator.control import bearer
from api.emulator.state import EmulatorState

BASE = "/compatible-mode/v1"
MAX_LIST_LIMIT = 100
Handler = Callable[[Request], Awaitable[Any]]


def batch_routes(state: EmulatorState) -> list[Route]:
    """The Batch File API's routes over `state`."""

    def answering(handler: Callable[[EmulatorState, Request], Awaitable[Any]]) -> Handler:
        async def endpoint(request: Request) -> Response:
            request_id = str(uuid.uuid4())
            try:
                if bearer(request) not in state.config.api_keys:
                    raise errors.unauthorized()
                result = await handler(state, request)
            except BatchError as exc:
                return _json(exc.body(request_id), exc.status, request_id)
            except errors.ProviderError as exc:
                return _json(exc.body("compatible", request_id), exc.status, request_id)
            if isinstance(result, bytes):
                headers = {"x-request-id": request_id}
                return Response(result, 200, headers, media_type="application/octet-stream")
            return _json(result, 200, request_id)

        return endpoint

    return [
        Route(f"{BASE}/files", answering(upload), methods=["POST"]),
        Route(f"{BASE}/files/{{file_id}}", answering(file_info), methods=["GET"]),
        Route(f"{BASE}/files/{{file_id}}/content", answering(file_content), methods=["GET"]),
        Route(f"{BASE}/batches", answering(create_batch), methods=["POST"]),
        Route(f"{BASE}/batches", answering(list_batches), methods=["GET"]),
        Route(f"{BASE}/batches/{{batch_id}}", answering(get_batch), methods=["GET"]),
        Route(f"{BASE}/batches/{{batch_id}}/cancel", answering(cancel_batch), methods=["POST"]),
    ]


async def upload(state: EmulatorState, request: Request) -> dict[str, Any]:
    fields = _multipart(request.headers.get("content-type", ""), await request.body())
    content, filename = fields.get("file", (None, None))
    purpose = fields.get("purpose", (b"", None))[0]
    if content is None:
        raise BatchError(400, "invalid_parameter_error", "a multipart field `file` is required", "file")
    return state.batches.add_file(
        filename or "input.jsonl", purpose.decode("utf-8", "replace"), content
    ).public()


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[bytes, str | None]]:
    """Fields of a multipart/form-data body: name → (bytes, filename)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise BatchError(400, "invalid_parameter_error", "the body must be multipart/form-data")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, tuple[bytes, str | None]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            payload = part.get_payload(decode=True)
            fields[name] = (payload if isinstance(payload, bytes) else b"", part.get_filename())
    return fields


async def file_info(state: EmulatorState, request: Request) -> dict[str, Any]:
    return state.batches.get_file(request.path_params["file_id"]).public()


async def file_content(state: EmulatorState, request: Request) -> bytes:
    return state.batches.file_content(request.path_params["file_id"])


async def create_batch(state: EmulatorState, request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise BatchError(400, "invalid_parameter_error", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise BatchError(400, "invalid_parameter_error", "The request body must be a JSON object.")
    config = state.config
    expires = state.draw(config.batch_expire_rate)
    job = await asyncio.to_thread(state.batches.create_job, body, config, expires)
    if job.status != "failed":  # work the lines out while the job's clock runs
        draws = [state.draw(config.batch_fail_rate) for _ in job.lines]
        thread = threading.Thread(target=state.batches.precompute, args=(job, config, draws), daemon=True)
        thread.start()
    return job.public()


async def get_batch(state: EmulatorState, request: Request) -> dict[str, Any]:
    await asyncio.to_thread(state.finish_batches)
    return state.batches.get_job(request.path_params["batch_id"]).public()


async def list_batches(state: EmulatorState, request: Request) -> dict[str, Any]:
    params = request.query_params
    try:
        limit = int(params.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise BatchError(400, "invalid_parameter_error", "limit must be an integer from 1 to 100", "limit")
    await asyncio.to_thread(state.finish_batches)
    jobs, more = state.batches.list_jobs(params.get("after"), limit, params.get("ds_name"))
    data = [job.public() for job in jobs]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


async def cancel_batch(state: EmulatorState, request: Request) -> dict[str, Any]:
    return state.batches.cancel(request.path_params["batch_id"]).public()


def _json(body: dict[str, Any], status: int, request_id: str) -> Response:
    content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(content, status, {"x-request-id": request_id}, media_type="application/json")
