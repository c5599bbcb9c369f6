"""The ledger (GET /v1/requests), spend by group (GET /v1/spend) and budget caps (/v1/budget)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from sqlalchemy.orm import Session

from api import deps
from api.auth import can_read, can_write
from api.deps import session
from api.schemas import CapIn, Grouping, Name, RequestStatus, Since, Text, Until, as_utc
from worker.ledger import budget, reports, spending
from worker.settings import Settings

router = APIRouter()


def encode_cursor(position: tuple[dt.datetime, str]) -> str:
    raw = json.dumps([position[0].isoformat(), position[1]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    """The position `encode_cursor` wrote; 422 for anything else."""
    try:
        at, rid = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        position = as_utc(dt.datetime.fromisoformat(at)), str(rid)
    except (ValueError, TypeError, binascii.Error):  # UnicodeDecodeError is a ValueError
        position = None
    if position is None or not (position[1].isascii() and position[1].isprintable()):
        problem = {"loc": ["query", "cursor"], "msg": "not a cursor this API gave out", "type": "value_error"}
        raise HTTPException(422, [problem])
    return position


@router.get("/v1/requests", dependencies=[Depends(can_read)], summary="The spend ledger, newest first")
def get_requests(
    since: Since = None,
    until: Until = None,
    model: Annotated[Text | None, Query(max_length=64)] = None,
    collection: Annotated[Name | None, Query()] = None,
    status: Annotated[RequestStatus | None, Query()] = None,
    provider_request_id: Annotated[Text | None, Query(max_length=128)] = None,
    cursor: Annotated[
        str | None, Query(max_length=512, description="next_cursor of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    s: Session = Depends(session),
) -> dict[str, Any]:
    """One row per provider call. Follow `next_cursor` until it is null."""
    items, after = reports.requests_page(
        s,
        since=since,
        until=until,
        model=model,
        collection=collection,
        status=status,
        provider_request_id=provider_request_id,
        after=decode_cursor(cursor) if cursor else None,
        limit=limit,
    )
    return {"items": items, "next_cursor": encode_cursor(after) if after else None}


@router.get("/v1/spend", dependencies=[Depends(can_read)], summary="Tokens, requests and cost by group")
def get_spend(
    by: Annotated[Grouping | None, Query()] = None,
    group_by: Annotated[Grouping | None, Query(description="the same as `by`")] = None,
    since: Since = None,
    until: Until = None,
    s: Session = Depends(session),
) -> dict[str, Any]:
    """Billed tokens, requests, rows and CNY (decimal strings) per group over [since, until), with
    the tokens avoided by dedup and by coalescing beside the tokens spent. By `lane`: realtime and
    batch (documents) and query (searches)."""
    if by is not None and group_by is not None and by != group_by:
        problem = {"loc": ["query", "group_by"], "msg": "differs from `by`; give one", "type": "value_error"}
        raise HTTPException(422, [problem])
    return spending.spend(s, by=by or group_by or "day", since=since, until=until)


@router.get("/v1/budget", dependencies=[Depends(can_read)], summary="Caps, spend in their windows, pauses")
def get_budget(settings: Settings = Depends(deps.settings), s: Session = Depends(session)) -> dict[str, Any]:
    return budget.budget_state(s, settings)


@router.put("/v1/budget/caps", dependencies=[Depends(can_write)], summary="Set a cap (overrides settings)")
def put_cap(
    cap: CapIn, settings: Settings = Depends(deps.settings), s: Session = Depends(session)
) -> dict[str, Any]:
    """Takes effect for the next request; raising a cap resumes paused documents at once."""
    limit = None if cap.limit_cny is None else budget.parse_cny(cap.limit_cny)
    budget.set_cap(s, collection=cap.collection, period=cap.period, limit_nano=limit)
    s.commit()
    return budget.budget_state(s, settings)


@router.delete(
    "/v1/budget/caps",
    dependencies=[Depends(can_write)],
    summary="Forget the API's cap for a scope: the settings' cap applies again",
)
def delete_cap(
    period: Annotated[budget.Period, Query()],
    collection: Annotated[Name | None, Query()] = None,
    settings: Settings = Depends(deps.settings),
    s: Session = Depends(session),
) -> dict[str, Any]:
    budget.clear_cap(s, collection=collection, period=period)
    s.commit()
    return budget.budget_state(s, settings)
