"""The spend ledger: one row per provider call, written before the call and completed after.

A crash between the provider's answer and our commit leaves a `sent` row with its estimate,
never a silent gap; the reconciler closes such rows as `unknown`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.catalog import MODELS
from worker.embedding.base import EmbedResult
from worker.errors import CallInfo
from worker.sql.models import ProviderRequest, RequestItem, utcnow


@dataclass(frozen=True)
class ItemRef:
    """One row of a request: which document version and chunk it serves."""

    document_id: int
    version: int
    chunk_index: int
    content_hash: str
    est_tokens: int


REQUESTS = cast("sa.Table", ProviderRequest.__table__)  # Core statements on the hot path


def open_request(
    session: Session,
    *,
    request_id: str,
    model: str,
    dimensions: int,
    api: str,
    rows: int,
    est_tokens: int,
    items: list[ItemRef],
    attempt: int,
    key_fingerprint: str | None,
    worker: str,
    lane: str = "realtime",
    collection: str | None = None,
    tenant: str | None = None,
) -> None:
    """The intent row, before the call. `collection` and `tenant` attribute a row that serves
    no document (a search query: no `items`); document rows are attributed through their items."""
    session.execute(  # Core: the ORM's unit of work costs more CPU than the insert
        sa.insert(REQUESTS).values(
            id=request_id,
            status="sent",
            model=model,
            dimensions=dimensions,
            api=api,
            rows=rows,
            est_tokens=est_tokens,
            attempt=attempt,
            key_fingerprint=key_fingerprint,
            worker=worker,
            created_at=utcnow(),
            lane=lane,
            collection=collection,
            tenant=tenant,
        )
    )
    if items:
        session.execute(  # Core, not the ORM's bulk insert: the driver's executemany
            sa.insert(cast("sa.Table", RequestItem.__table__)),
            [{"request_id": request_id, **item.__dict__} for item in items],
        )


def record_success(session: Session, request_id: str, result: EmbedResult, cost_nano_cny: int) -> None:
    session.execute(
        sa.update(REQUESTS)
        .where(REQUESTS.c.id == request_id)
        .values(
            status="succeeded",
            provider_request_id=result.request_id,
            billed_tokens=result.billed_tokens,
            cost_nano_cny=cost_nano_cny,
            http_status=result.http_status,
            latency_ms=result.latency_ms,
            completed_at=utcnow(),
        )
    )


def record_failure(
    session: Session,
    request_id: str,
    call: CallInfo | None,
    *,
    message: str,
    unknown_cost_nano: int | None = None,
) -> None:
    """A failed call: nothing billed; or, given `unknown_cost_nano`, a call whose outcome cannot
    be known (read timeout), closed as `unknown` with its estimate so spend is never understated."""
    call = call or CallInfo()
    unknown = unknown_cost_nano is not None
    session.execute(
        sa.update(ProviderRequest)
        .where(ProviderRequest.id == request_id)
        .values(
            status="unknown" if unknown else "failed",
            provider_request_id=call.request_id,
            billed_tokens=ProviderRequest.est_tokens if unknown else 0,
            cost_nano_cny=unknown_cost_nano if unknown else 0,
            http_status=call.http_status,
            error_code=call.error_code,
            error_message=message[:2000],
            latency_ms=call.latency_ms,
            completed_at=utcnow(),
        )
    )


def close_abandoned(session: Session, *, older_than: dt.datetime) -> int:
    """Rows still `sent` long after their call must have ended (the worker died mid-call):
    closed as `unknown` with their estimate. Returns how many."""
    rows = session.execute(
        sa.select(ProviderRequest.id, ProviderRequest.model, ProviderRequest.est_tokens).where(
            ProviderRequest.status == "sent",
            ProviderRequest.created_at < older_than,
            ProviderRequest.lane != "batch",  # a batch job runs for hours: worker/batch/ closes it
        )
    ).all()
    for request_id, model, est_tokens in rows:
        spec = MODELS.get(model)
        session.execute(
            sa.update(ProviderRequest)
            .where(ProviderRequest.id == request_id, ProviderRequest.status == "sent")
            .values(
                status="unknown",
                billed_tokens=est_tokens,
                cost_nano_cny=spec.cost_nano_cny(est_tokens) if spec else None,
                error_message="no outcome recorded (the worker stopped mid-call); closed with the estimate",
                completed_at=utcnow(),
            )
        )
    return len(rows)
