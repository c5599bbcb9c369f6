"""The ledger (GET /v1/requests), spend by group (GET /v1/spend) and budget caps (/v1/budget)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from api.auth import can_read, can_write
from api.deps import session
from worker.ledger import budget, reports

router = APIRouter()
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
CNY_PATTERN = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"
Since = Annotated[dt.datetime | None, Query(description="from this instant (ISO 8601; UTC when no offset)")]
Until = Annotated[dt.datetime | None, Query(description="up to, not including, this instant")]


def _utc(at: dt.datetime | None) -> dt.datetime | None:
    if at is None:
        return None
    return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)


def encode_cursor(position: tuple[dt.datetime, str]) -> str:
    raw = json.dumps([position[0].isoformat(), position[1]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        at, rid = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        position = dt.datetime.fromisoformat(at), str(rid)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise HTTPException(
            422,
            [{"loc": ["query", "cursor"], "msg": "not a cursor this API gave out", "type": "value_error"}],
        ) from None
    return _utc(position[0]), position[1]  # type: ignore[return-value]


@router.get("/v1/requests", dependencies=[Depends(can_read)], summary="The spend ledger, newest first")
def get_requests(
    since: Since = None,
    until: Until = None,
    model: Annotated[str | None, Query(max_length=64)] = None,
    collection: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    status: Annotated[Literal["sent", "succeeded", "failed", "unknown"] | None, Query()] = None,
    provider_request_id: Annotated[str | None, Query(max_length=128)] = None,
    cursor: Annotated[
        str | None, Query(max_length=512, description="next_cursor of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    s: Session = Depends(session),
) -> dict[str, Any]:
    """One row per provider call. Follow `next_cursor` until it is null."""
    items, after = reports.requests_page(
        s,
        since=_utc(since),
        until=_utc(until),
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
    by: Annotated[Literal["hour", "day", "model", "collection", "tenant"], Query()] = "day",
    since: Since = None,
    until: Until = None,
    s: Session = Depends(session),
) -> dict[str, Any]:
    """Billed tokens, requests, rows and CNY (decimal strings) per group over [since, until), with
    the tokens avoided by dedup and by coalescing beside the tokens spent."""
    return reports.spend(s, by=by, since=_utc(since), until=_utc(until))


class CapIn(BaseModel):
    period: Literal["day", "month"]
    collection: str | None = Field(None, pattern=NAME_PATTERN, description="null: all collections")
    limit_cny: str | None = Field(
        description="CNY as a decimal string; null: no cap for this scope", pattern=CNY_PATTERN
    )


@router.get("/v1/budget", dependencies=[Depends(can_read)], summary="Caps, spend in their windows, pauses")
def get_budget(request: Request, s: Session = Depends(session)) -> dict[str, Any]:
    return budget.budget_state(s, request.app.state.settings)


@router.put("/v1/budget/caps", dependencies=[Depends(can_write)], summary="Set a cap (overrides settings)")
def put_cap(request: Request, cap: CapIn, s: Session = Depends(session)) -> dict[str, Any]:
    """Takes effect for the next request; raising a cap resumes paused documents at once."""
    limit = None if cap.limit_cny is None else budget.parse_cny(cap.limit_cny)
    budget.set_cap(s, collection=cap.collection, period=cap.period, limit_nano=limit)
    s.commit()
    return budget.budget_state(s, request.app.state.settings)


@router.delete(
    "/v1/budget/caps",
    dependencies=[Depends(can_write)],
    summary="Forget the API's cap for a scope: the settings' cap applies again",
)
def delete_cap(
    request: Request,
    period: Annotated[Literal["day", "month"], Query()],
    collection: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    s: Session = Depends(session),
) -> dict[str, Any]:
    budget.clear_cap(s, collection=collection, period=period)
    s.commit()
    return budget.budget_state(s, request.app.state.settings)
