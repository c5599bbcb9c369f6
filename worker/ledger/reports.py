"""Read-only summaries of state and the ledger, as plain dicts (the CLI and the API print them).

Spend by period, model, lane, collection or tenant is computed in worker/ledger/spending.py; `spend`
and `GROUPINGS` are offered here too, beside the other reports.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.batch.report import batch_status
from worker.catalog import cny_str
from worker.ledger import budget, rollups
from worker.ledger.spending import GROUPINGS, in_range, spend
from worker.settings import Settings
from worker.sql import documents, pauses
from worker.sql.models import Document, ProviderRequest, RejectedEvent, RequestItem

__all__ = ["GROUPINGS", "REQUEST_STATUSES", "document", "requests_page", "spend", "status"]
REQUEST_STATUSES = ("sent", "succeeded", "failed", "unknown")


def status(session: Session, settings: Settings) -> dict[str, Any]:
    requests = rollups.requests_by_status(session)  # O(roll-up rows), not a ledger scan
    age = documents.oldest_pending_age_s(session)
    return {
        "documents": documents.document_counts(session),
        "requests": {k: requests.get(k, 0) for k in REQUEST_STATUSES},
        "oldest_pending_age_s": None if age is None else round(age, 3),
        "budget": budget.budget_state(session, settings),
        "provider_pauses": pauses.current(session),  # account errors pause embedding for everyone
        "batch": batch_status(session, settings),  # the batch lane: jobs, waiting, or why it falls back
    }


# --- the ledger, one page at a time -----------------------------------------------------------


def requests_page(
    session: Session,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    model: str | None = None,
    collection: str | None = None,
    status: str | None = None,
    provider_request_id: str | None = None,
    after: tuple[dt.datetime, str] | None = None,
    limit: int = 100,
) -> tuple[list[dict[str, Any]], tuple[dt.datetime, str] | None]:
    """Ledger rows newest first; returns (rows, the position after the last row or None at the end)."""
    pr = ProviderRequest
    where = in_range(pr.created_at, since, until)
    if model is not None:
        where.append(pr.model == model)
    if status is not None:
        where.append(pr.status == status)
    if provider_request_id is not None:
        where.append(pr.provider_request_id == provider_request_id)
    if collection is not None:
        where.append(
            sa.or_(
                pr.collection == collection,  # a query row names its collection
                sa.exists().where(
                    RequestItem.request_id == pr.id,
                    Document.id == RequestItem.document_id,
                    Document.collection == collection,
                ),
            )
        )
    if after is not None:
        at, rid = after
        where.append(sa.or_(pr.created_at < at, sa.and_(pr.created_at == at, pr.id < rid)))
    query = sa.select(pr).where(*where).order_by(pr.created_at.desc(), pr.id.desc()).limit(limit + 1)
    rows = list(session.execute(query).scalars())
    more = len(rows) > limit
    rows = rows[:limit]
    collections = _collections_of(session, [r.id for r in rows])
    for r in rows:
        if r.collection is not None:  # a query row names its collection
            collections[r.id].add(r.collection)
    items = [_request_row(r, sorted(collections[r.id])) for r in rows]
    return items, ((rows[-1].created_at, rows[-1].id) if more else None)


def _collections_of(session: Session, request_ids: list[str]) -> dict[str, set[str]]:
    collections: dict[str, set[str]] = defaultdict(set)
    if request_ids:
        for rid, name in session.execute(
            sa.select(RequestItem.request_id, Document.collection)
            .distinct()
            .join(Document, Document.id == RequestItem.document_id)
            .where(RequestItem.request_id.in_(request_ids))
        ):
            collections[rid].add(name)
    return collections


def _request_row(r: ProviderRequest, collections: list[str]) -> dict[str, Any]:
    return {
        "id": r.id,
        "provider_request_id": r.provider_request_id,
        "status": r.status,
        "model": r.model,
        "dimensions": r.dimensions,
        "api": r.api,
        "rows": r.rows,
        "est_tokens": r.est_tokens,
        "billed_tokens": r.billed_tokens,
        "cost_nano_cny": r.cost_nano_cny,
        "cost_cny": None if r.cost_nano_cny is None else cny_str(r.cost_nano_cny),
        "http_status": r.http_status,
        "error_code": r.error_code,
        "error_message": r.error_message,
        "latency_ms": r.latency_ms,
        "attempt": r.attempt,
        "key_fingerprint": r.key_fingerprint,
        "worker": r.worker,
        "created_at": r.created_at.isoformat(),
        "completed_at": None if r.completed_at is None else r.completed_at.isoformat(),
        "lane": r.lane,
        "collections": collections,
    }


# --- one document -----------------------------------------------------------------------------


def document(
    session: Session,
    *,
    collection: str,
    doc_id: str,
    tenant: str,
    default_collection: str,
    last_requests: int = 5,
) -> dict[str, Any] | None:
    """A document's state, its latest ledger rows, or its latest rejection (status `rejected`)."""
    doc = session.execute(
        sa.select(Document).filter_by(tenant=tenant, collection=collection, doc_id=doc_id)
    ).scalar_one_or_none()
    if doc is None:
        return _rejected(session, tenant, collection, doc_id, default_collection)
    return {
        "tenant": doc.tenant,
        "collection": doc.collection,
        "doc_id": doc.doc_id,
        "status": doc.status,
        "version": doc.version,
        "indexed_version": doc.indexed_version,
        "chunks": doc.chunk_count,
        "content_hash": doc.text_hash,
        "indexed_hash": doc.indexed_hash,
        "attempts": doc.attempts,
        "last_error": doc.last_error,
        "updated_at": doc.updated_at.isoformat(),
        "last_requests": _last_requests(session, doc.id, last_requests),
    }


def _rejected(
    session: Session, tenant: str, collection: str, doc_id: str, default_collection: str
) -> dict[str, Any] | None:
    """The latest rejection of an event for this document, shaped like a document's state."""
    same_collection = RejectedEvent.collection == collection
    if collection == default_collection:
        same_collection = sa.or_(same_collection, RejectedEvent.collection.is_(None))
    rejected = session.execute(
        sa.select(RejectedEvent)
        .where(RejectedEvent.doc_id == doc_id, same_collection)
        .order_by(RejectedEvent.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    if rejected is None:
        return None
    return {
        "tenant": tenant,
        "collection": collection,
        "doc_id": doc_id,
        "status": "rejected",
        "version": None,
        "indexed_version": None,
        "chunks": None,
        "content_hash": None,
        "attempts": 0,
        "last_error": f"{rejected.field}: {rejected.reason}",
        "last_requests": [],
        "updated_at": rejected.received_at.isoformat(),
    }


def _last_requests(session: Session, document_id: int, limit: int) -> list[dict[str, Any]]:
    pr = ProviderRequest
    rows = session.execute(
        sa.select(pr.id, pr.provider_request_id, pr.status, pr.created_at, RequestItem.version)
        .join(RequestItem, RequestItem.request_id == pr.id)
        .where(RequestItem.document_id == document_id)
        .group_by(pr.id, pr.provider_request_id, pr.status, pr.created_at, RequestItem.version)
        .order_by(pr.created_at.desc(), pr.id.desc())
        .limit(limit)
    ).all()
    return [
        {
            "id": r.id,
            "provider_request_id": r.provider_request_id,
            "status": r.status,
            "version": r.version,
            "created_at": r.created_at.isoformat(),
        }
        for r in rows
    ]
