"""Events in (POST /v1/events), one document's state, and dead letters.

An event is checked by `worker.events.parse_with`, the same call the worker makes, so whatever
the worker would reject is answered 422 here and never queued.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import deps
from api.auth import can_read, can_write
from api.deps import session
from api.schemas import EVENTS_BODY, EventProblems, EventsAccepted, Message, Name, body_problem
from worker.errors import InvalidEvent
from worker.events import Event, parse_with
from worker.ledger import reports
from worker.settings import Settings
from worker.sql import deadletters

router = APIRouter()
BROKER_RETRY_AFTER_S = 5


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: echoing a field name or a doc_id that is not
    valid Unicode (a lone surrogate) cannot fail to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class Refused(Exception):
    """The posted body is refused as a whole: answered `status` with its problems."""

    def __init__(self, status: int, problems: list[dict[str, Any]]) -> None:
        super().__init__(status)
        self.status = status
        self.problems = problems


def events_of(body: bytes, max_events: int) -> list[Any]:
    """The posted event or list of events as a list; Refused unless the body is one."""
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise Refused(422, body_problem(f"not valid JSON ({exc})"[:300])) from None
    events = raw if isinstance(raw, list) else [raw]
    if not events:
        raise Refused(422, body_problem("an event or a non-empty list of events"))
    if len(events) > max_events:
        raise Refused(413, body_problem(f"{len(events)} events is over the cap of {max_events}"))
    return events


def accepted_events(events: list[Any], settings: Settings) -> list[dict[str, Any]]:
    """Each event's index, doc_id and collection; Refused(422) listing every event that breaks the
    contract (all or nothing)."""
    accepted, problems = [], []
    for index, item in enumerate(events):
        try:
            event = parse_with(item, settings)
        except InvalidEvent as exc:
            problems.append({"index": index, "field": exc.field, "rule": exc.rule})
            continue
        accepted.append({"index": index, "doc_id": event.doc_id, "collection": event.collection})
    if problems:
        raise Refused(422, problems)
    return accepted


@router.post(
    "/v1/events",
    status_code=202,
    response_model=EventsAccepted,
    dependencies=[Depends(can_write)],
    openapi_extra=EVENTS_BODY,
    responses={
        413: {"model": EventProblems},
        422: {"model": EventProblems},
        503: {"model": Message},
    },
    summary="Publish one event or a list of events",
)
async def post_events(request: Request, settings: Settings = Depends(deps.settings)) -> Response:
    """Validate every event and hand the list to the worker (task `sidecar.ingest_many`).

    All or nothing: one invalid event answers 422 listing every bad event (index, field, rule)
    and nothing is sent. 413 when the body is over SIDECAR_API_MAX_BODY_BYTES or the list is over
    SIDECAR_API_MAX_EVENTS; 503 with Retry-After when the broker does not take the message.
    """
    try:
        events = events_of(await request.body(), settings.api_max_events)
        accepted = accepted_events(events, settings)
    except Refused as exc:
        return AsciiJSONResponse({"detail": exc.problems}, status_code=exc.status)
    task_id = str(uuid.uuid4())
    # rendered before publishing: once the broker has the message, nothing is left that can fail
    answer = AsciiJSONResponse(
        {"accepted": len(accepted), "task_id": task_id, "events": accepted}, status_code=202
    )
    try:
        await run_in_threadpool(publish, request.app.state.celery, events, task_id)
    except Exception as exc:  # the broker did not take the message: nothing was accepted
        raise HTTPException(
            503,
            f"the broker did not accept the events ({type(exc).__name__}); retry",
            headers={"Retry-After": str(BROKER_RETRY_AFTER_S)},
        ) from None
    return answer


def publish(celery: Any, events: list[Any], task_id: str) -> None:
    """One `sidecar.ingest_many` message holding every event, as posted."""
    celery.send_task(
        "sidecar.ingest_many",
        args=[events],
        task_id=task_id,
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
    collection: Annotated[Name, Path()],
    doc_id: Annotated[str, Path(description="as in the event (its rules apply)")],
    tenant: Annotated[Name | None, Query()] = None,
    settings: Settings = Depends(deps.settings),
    s: Session = Depends(session),
) -> dict[str, Any]:
    """Status is pending, indexed, deleted, dead, or rejected (only a rejected event was seen)."""
    key = document_key(settings, collection=collection, doc_id=doc_id, tenant=tenant)
    found = reports.document(
        s,
        collection=key.collection,
        doc_id=key.doc_id,
        tenant=key.tenant,
        default_collection=settings.default_collection,
    )
    if found is None:
        raise HTTPException(404, f"no document {doc_id!r} in collection {collection!r}")
    return found


def document_key(settings: Settings, **names: str | None) -> Event:
    """The document named by a path, checked by the event contract (a delete event naming it);
    422 naming the field when no event could name it."""
    raw = {"op": "delete", **{k: v for k, v in names.items() if v is not None}}
    try:
        return parse_with(raw, settings)
    except InvalidEvent as exc:
        where = "query" if exc.field == "tenant" else "path"
        problem = {"loc": [where, exc.field], "msg": exc.rule, "type": "value_error"}
        raise HTTPException(422, [problem]) from None


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
    id: Annotated[int, Path(ge=1, le=2**62)], s: Session = Depends(session)
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
