"""The request body cap (SIDECAR_API_MAX_BODY_BYTES), applied before routing, auth or any read.

A declared Content-Length over the cap answers 413 at once, without reading the body; a streamed
(chunked) body is counted as it arrives and stopped with 413 as soon as it passes the cap. Either
way at most the cap is ever held in memory, and the connection is closed after the answer.
"""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.schemas import body_problem

CLOSE = {"Connection": "close"}
MAX_DIGITS = 18  # a longer Content-Length is over any cap (and int() of thousands of digits raises)


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a streamed body passes the cap; FastAPI answers it with 413."""

    def __init__(self, max_body_bytes: int) -> None:
        super().__init__(413, detail=too_large(max_body_bytes), headers=CLOSE)


def too_large(max_body_bytes: int) -> list[dict[str, object]]:
    return body_problem(f"over the cap of {max_body_bytes} bytes")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            response = JSONResponse({"detail": too_large(self.max_body_bytes)}, 413, headers=CLOSE)
            await response(scope, receive, send)
            return
        await self.app(scope, self.counted(receive), send)

    def counted(self, receive: Receive) -> Receive:
        """`receive` that raises BodyTooLarge once the body so far is over the cap."""
        received = 0

        async def receive_capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        return receive_capped


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, or None when it has none (or none that is a number)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if not value.isdigit():
                return None
            return int(value) if len(value) <= MAX_DIGITS else 10**MAX_DIGITS
    return None
