"""Events in (POST /v1/events), one document's state, and dead letters."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.auth import can_read, can_write
from api.deps import session
from worker.errors import InvalidEvent
from worker.events import parse_with
from worker.ledger import reports
from worker.sql import deadletters

router = APIRouter()
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class EventIn(BaseModel):
    """One event (DESIGN §2); the same object producers send to the `sidecar.ingest` task."""

    model_config = {"extra": "forbid"}

    op: Literal["upsert", "delete"]
    doc_id: str = Field(min_length=1, max_length=512)
    collection: str | None = Field(None, pattern=NAME_PATTERN)
    version: int | None = Field(None, ge=0, le=2**63 - 1)
    text: str | None = Field(None, description="required for upsert, not allowed for delete")
    metadata: dict[str, Any] | None = None
    tenant: str | None = Field(None, pattern=NAME_PATTERN)
    event_id: str | None = Field(None, min_length=1, max_length=256)


class AcceptedEvent(BaseModel):
    index: int
    doc_id: str
    collection: str


class EventsAccepted(BaseModel):
    accepted: int
    task_id: str
    events: list[AcceptedEvent]


class EventProblem(BaseModel):
    index: int | None = Field(
        description="position in the posted list (0 for a single event); null: the body"
    )
    field: str
    rule: str


class EventProblems(BaseModel):
    detail: list[EventProblem]


class Message(BaseModel):
    detail: str


_event_schema = EventIn.model_json_schema()
_EVENTS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [_event_schema, {"type": "array", "items": _event_schema, "minItems": 1}],
                }
            }
        },
    }
}


def _problems(status: int, problems: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"detail": problems}, status_code=status)


async def _read_body(request: Request, cap: int) -> bytes | None:
    """The body, or None when it is over `cap` bytes (checked before and while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        return None
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > cap:
            return None
    return bytes(body)


@router.post(
    "/v1/events",
    status_code=202,
    response_model=EventsAccepted,
    dependencies=[Depends(can_write)],
    openapi_extra=_EVENTS_BODY,
    responses={413: {"model": EventProblems}, 422: {"model": EventProblems}, 503: {"model": Message}},
    summary="Publish one event or a list of events",
)
async def post_events(request: Request) -> Any:
    """Validate every event and hand the list to the worker (task `sidecar.ingest_many`).

    All or nothing: one invalid event answers 422 listing every bad event (index, field, rule)
    and nothing is sent. 413 when the body is over SIDECAR_API_MAX_BODY_BYTES or the list is over
    SIDECAR_API_MAX_EVENTS.
    """
    api = settings = request.app.state.settings
    body = await _read_body(request, api.api_max_body_bytes)
    if body is None:
        return _problems(
            413, [{"index": None, "field": "body", "rule": f"over the cap of {api.api_max_body_bytes} bytes"}]
        )
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return _problems(422, [{"index": None, "field": "body", "rule": f"not valid JSON ({exc})"}])
    events = raw if isinstance(raw, list) else [raw]
    if not events:
        return _problems(
            422, [{"index": None, "field": "body", "rule": "an event or a non-empty list of events"}]
        )
    if len(events) > api.api_max_events:
        return _problems(
            413,
            [
                {
                    "index": None,
                    "field": "body",
                    "rule": f"{len(events)} events is over the cap of {api.api_max_events}",
                }
            ],
        )
    accepted, problems = [], []
    for index, item in enumerate(events):
        try:
            event = parse_with(item, settings)
        except InvalidEvent as exc:
            problems.append({"index": index, "field": exc.field, "rule": exc.rule})
            continue
        accepted.append({"index": index, "doc_id": event.doc_id, "collection": event.collection})
    if problems:
        return _problems(422, problems)
    try:
        result = await run_in_threadpool(_send, request.app.state.celery, events)
    except Exception as exc:  # the broker did not take the message: nothing was accepted
        raise HTTPException(
            503, f"the broker did not accept the events ({type(exc).__name__}); retry"
        ) from exc
    return {"accepted": len(accepted), "task_id": result.id, "events": accepted}


def _send(celery: Any, events: list[Any]) -> Any:
    return celery.send_task(
        "sidecar.ingest_many",
        args=[events],
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
    )


@router.get(
    "/v1/documents/{collection}/{doc_id:path}",
    dependencies=[Depends(can_read)],
    responses={404: {"model": Message}},
    summary="One document: version, status, chunks, content hash, last requests, last error",
)
def get_document(
    request: Request,
    collection: Annotated[str, Path(pattern=NAME_PATTERN)],
    doc_id: Annotated[str, Path(min_length=1, max_length=512)],
    tenant: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    s: Session = Depends(session),
) -> dict[str, Any]:
    """Status is pending, indexed, deleted, dead, or rejected (only a rejected event was seen)."""
    settings = request.app.state.settings
    found = reports.document(
        s,
        collection=collection,
        doc_id=doc_id,
        tenant=tenant or settings.default_tenant,
        default_collection=settings.default_collection,
    )
    if found is None:
        raise HTTPException(404, f"no document {doc_id!r} in collection {collection!r}")
    return found


@router.get("/v1/deadletters", dependencies=[Depends(can_read)], summary="Documents that gave up")
def get_deadletters(
    after_id: Annotated[
        int, Query(ge=0, le=2**62, description="cursor: the last id of the previous page")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    s: Session = Depends(session),
) -> dict[str, Any]:
    items = deadletters.list_dead(s, after_id=after_id, limit=limit)
    return {"items": items, "next_after_id": items[-1]["id"] if len(items) == limit else None}


@router.post(
    "/v1/deadletters/{id}/retry",
    dependencies=[Depends(can_write)],
    responses={404: {"model": Message}},
    summary="Send one dead letter back to pending",
)
def retry_deadletter(
    request: Request, id: Annotated[int, Path(ge=1, le=2**62)], s: Session = Depends(session)
) -> dict[str, int]:
    retried = deadletters.retry_dead(s, id)
    if not retried:
        raise HTTPException(404, f"document {id} is not a dead letter")
    s.commit()
    return {"retried": retried}


@router.post(
    "/v1/deadletters/retry",
    dependencies=[Depends(can_write)],
    summary="Send every dead letter back to pending",
)
def retry_all_deadletters(s: Session = Depends(session)) -> dict[str, int]:
    retried = deadletters.retry_dead(s, None)
    s.commit()
    return {"retried": retried}
