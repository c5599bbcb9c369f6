"""Read-only summaries of state, spend and the ledger, as plain dicts (the CLI and the API print them)."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.catalog import cny_str
from worker.ledger import budget
from worker.ledger.counters import AVOIDED_PREFIX, hour_bucket
from worker.sql import documents, pauses
from worker.settings import Settings
from worker.sql.models import (
    Document,
    HourlyCounter,
    ProviderRequest,
    RejectedEvent,
    RequestItem,
)

GROUPINGS = ("hour", "day", "model", "collection", "tenant")
REQUEST_STATUSES = ("sent", "succeeded", "failed", "unknown")
_SUMS = (
    "requests",
    "failed",
    "rows",
    "tokens",
    "cost_nano_cny",
    "tokens_avoided_dedup",
    "tokens_avoided_coalesced",
)


def status(session: Session, settings: Settings) -> dict[str, Any]:
    requests = dict(
        session.execute(
            sa.select(ProviderRequest.status, sa.func.count()).group_by(ProviderRequest.status)
        ).all()
    )
    age = documents.oldest_pending_age_s(session)
    return {
        "documents": documents.document_counts(session),
        "requests": {k: requests.get(k, 0) for k in REQUEST_STATUSES},
        "oldest_pending_age_s": None if age is None else round(age, 3),
        "budget": budget.budget_state(session, settings),
        "provider_pauses": pauses.current(session),  # account errors pause embedding for everyone
    }


# --- spend ------------------------------------------------------------------------------------


def _bucket_expr(session: Session, col: Any, fmt: str) -> sa.ColumnElement[str]:
    """UTC text of a timestamp column: fmt 'hour' → 2026-11-21T07, 'day' → 2026-11-21."""
    if session.get_bind().dialect.name == "postgresql":
        pattern = 'YYYY-MM-DD"T"HH24' if fmt == "hour" else "YYYY-MM-DD"
        return sa.func.to_char(sa.func.timezone("UTC", col), pattern)
    return sa.func.strftime("%Y-%m-%dT%H" if fmt == "hour" else "%Y-%m-%d", col)


def _in_range(col: Any, since: dt.datetime | None, until: dt.datetime | None) -> list[Any]:
    where = []
    if since is not None:
        where.append(col >= since)
    if until is not None:
        where.append(col < until)
    return where


def _allocate(total: int, parts: dict[Any, int]) -> dict[Any, int]:
    """Split an integer in proportion to `parts` (largest remainder; ties by key): sums to `total`."""
    weight = sum(parts.values())
    if weight <= 0:
        keys = sorted(parts, key=repr)
        return {k: (total if i == 0 else 0) for i, k in enumerate(keys)}
    shares = {k: total * w // weight for k, w in parts.items()}
    left = total - sum(shares.values())
    order = sorted(parts, key=lambda k: (-(total * parts[k] % weight), repr(k)))
    for k in order[:left]:
        shares[k] += 1
    return shares


def _empty() -> dict[str, int]:
    return {k: 0 for k in _SUMS}


def spend(
    session: Session,
    *,
    by: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> dict[str, Any]:
    """Requests, rows, billed tokens and CNY, grouped, with the tokens avoided beside them.

    `by` None groups by UTC day and model (the original report); otherwise one of GROUPINGS.
    Collection and tenant shares of a request follow the est_tokens of its items (largest
    remainder, so the groups sum to the total). Range: `since` ≤ created_at < `until`; tokens
    avoided are counted by the hour, so a range starting mid-hour includes that whole hour.
    """
    if by is not None and by not in GROUPINGS:
        raise ValueError(f"by must be one of {', '.join(GROUPINGS)}, got {by!r}")
    groups: dict[tuple, dict[str, int]] = defaultdict(_empty)
    distinct = None
    if by in ("collection", "tenant"):
        distinct = _spend_by_document(session, by, since, until, groups)
    else:
        _spend_by_request(session, by, since, until, groups)
    _avoided(session, by, since, until, groups)

    names = ("day", "model") if by is None else (by,)
    rows, total = [], _empty()
    for key in sorted(groups, key=lambda k: tuple("" if v is None else str(v) for v in k)):
        values = groups[key]
        rows.append(_money({**dict(zip(names, key)), **values}))
        for name in _SUMS:
            total[name] += values[name]
    if distinct is not None:
        total["requests"], total["failed"] = distinct
    return {
        "by": by or "day,model",
        "since": None if since is None else since.isoformat(),
        "until": None if until is None else until.isoformat(),
        "total": _money(total),
        "rows": rows,
    }


def _spend_by_request(session: Session, by: str | None, since: Any, until: Any, groups: dict) -> None:
    pr = ProviderRequest
    if by is None:
        keys = [_bucket_expr(session, pr.created_at, "day"), pr.model]
    elif by == "model":
        keys = [pr.model]
    else:
        keys = [_bucket_expr(session, pr.created_at, by)]
    labelled = [k.label(f"k{i}") for i, k in enumerate(keys)]
    query = (
        sa.select(
            *labelled,
            sa.func.count(),
            sa.func.sum(sa.case((pr.status != "succeeded", 1), else_=0)),
            sa.func.sum(sa.case((pr.status == "succeeded", pr.rows), else_=0)),
            sa.func.sum(sa.func.coalesce(pr.billed_tokens, 0)),
            sa.func.sum(sa.func.coalesce(pr.cost_nano_cny, 0)),
        )
        .where(*_in_range(pr.created_at, since, until))
        .group_by(*labelled)
    )
    for row in session.execute(query):
        key = tuple(row[: len(keys)])
        if by == "hour":
            key = (f"{key[0]}:00Z",)
        g = groups[key]
        for name, value in zip(("requests", "failed", "rows", "tokens", "cost_nano_cny"), row[len(keys) :]):
            g[name] += int(value or 0)


def _spend_by_document(session: Session, by: str, since: Any, until: Any, groups: dict) -> tuple[int, int]:
    """Fill `groups`; returns the distinct (requests, failed): a request that served several
    groups counts in each group but once in the total."""
    pr = ProviderRequest
    label = getattr(Document, by)
    query = (
        sa.select(
            pr.id,
            pr.status,
            pr.rows,
            pr.billed_tokens,
            pr.cost_nano_cny,
            label,
            sa.func.sum(RequestItem.est_tokens),
            sa.func.count(RequestItem.id),
        )
        .outerjoin(RequestItem, RequestItem.request_id == pr.id)
        .outerjoin(Document, Document.id == RequestItem.document_id)
        .where(*_in_range(pr.created_at, since, until))
        .group_by(pr.id, pr.status, pr.rows, pr.billed_tokens, pr.cost_nano_cny, label)
    )
    requests: dict[str, dict[str, Any]] = {}
    for rid, status_, rows, billed, cost, key, tokens, items in session.execute(query):
        r = requests.setdefault(
            rid,
            {
                "status": status_,
                "rows": rows,
                "billed": billed or 0,
                "cost": cost or 0,
                "parts": {},
                "items": {},
            },
        )
        r["parts"][key] = int(tokens or 0)
        r["items"][key] = int(items or 0)
    for r in requests.values():
        succeeded = r["status"] == "succeeded"
        token_shares = _allocate(r["billed"], r["parts"])
        cost_shares = _allocate(r["cost"], r["parts"])
        row_shares = _allocate(r["rows"] if succeeded else 0, r["items"])
        for key in r["parts"]:
            g = groups[(key,)]
            g["requests"] += 1
            g["failed"] += 0 if succeeded else 1
            g["rows"] += row_shares[key]
            g["tokens"] += token_shares[key]
            g["cost_nano_cny"] += cost_shares[key]
    return len(requests), sum(r["status"] != "succeeded" for r in requests.values())


def _avoided(session: Session, by: str | None, since: Any, until: Any, groups: dict) -> None:
    c = HourlyCounter
    if by is None:
        keys = [sa.func.substr(c.bucket, 1, 10), c.model]
    elif by == "hour":
        keys = [c.bucket]
    elif by == "day":
        keys = [sa.func.substr(c.bucket, 1, 10)]
    else:
        keys = [getattr(c, by)]
    where = [c.name.like(f"{AVOIDED_PREFIX}%")]
    if since is not None:
        where.append(c.bucket >= hour_bucket(since))
    if until is not None:
        on_the_hour = until.minute == until.second == until.microsecond == 0
        where.append(c.bucket < hour_bucket(until) if on_the_hour else c.bucket <= hour_bucket(until))
    labelled = [k.label(f"k{i}") for i, k in enumerate(keys)]
    query = sa.select(*labelled, c.name, sa.func.sum(c.value)).where(*where).group_by(*labelled, c.name)
    for row in session.execute(query):
        key = tuple(row[: len(keys)])
        if by == "hour":
            key = (f"{key[0]}:00Z",)
        groups[key][row[-2]] += int(row[-1] or 0)


def _money(row: dict[str, Any]) -> dict[str, Any]:
    """Add `cost_cny` as a decimal string (JSON has no decimals; floats are never used)."""
    return {**row, "cost_cny": cny_str(row["cost_nano_cny"])}


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
    where = _in_range(pr.created_at, since, until)
    if model is not None:
        where.append(pr.model == model)
    if status is not None:
        where.append(pr.status == status)
    if provider_request_id is not None:
        where.append(pr.provider_request_id == provider_request_id)
    if collection is not None:
        where.append(
            sa.exists().where(
                RequestItem.request_id == pr.id,
                Document.id == RequestItem.document_id,
                Document.collection == collection,
            )
        )
    if after is not None:
        at, rid = after
        where.append(sa.or_(pr.created_at < at, sa.and_(pr.created_at == at, pr.id < rid)))
    rows = (
        session.execute(
            sa.select(pr).where(*where).order_by(pr.created_at.desc(), pr.id.desc()).limit(limit + 1)
        )
        .scalars()
        .all()
    )
    more = len(rows) > limit
    rows = rows[:limit]
    collections: dict[str, set[str]] = defaultdict(set)
    if rows:
        for rid, name in session.execute(
            sa.select(RequestItem.request_id, Document.collection)
            .distinct()
            .join(Document, Document.id == RequestItem.document_id)
            .where(RequestItem.request_id.in_([r.id for r in rows]))
        ):
            collections[rid].add(name)
    items = [
        {
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
            "collections": sorted(collections[r.id]),
        }
        for r in rows
    ]
    return items, ((rows[-1].created_at, rows[-1].id) if more else None)


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
    requests = session.execute(
        sa.select(
            ProviderRequest.id,
            ProviderRequest.provider_request_id,
            ProviderRequest.status,
            ProviderRequest.created_at,
            RequestItem.version,
        )
        .join(RequestItem, RequestItem.request_id == ProviderRequest.id)
        .where(RequestItem.document_id == doc.id)
        .group_by(
            ProviderRequest.id,
            ProviderRequest.provider_request_id,
            ProviderRequest.status,
            ProviderRequest.created_at,
            RequestItem.version,
        )
        .order_by(ProviderRequest.created_at.desc(), ProviderRequest.id.desc())
        .limit(last_requests)
    ).all()
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
        "last_requests": [
            {
                "id": r.id,
                "provider_request_id": r.provider_request_id,
                "status": r.status,
                "version": r.version,
                "created_at": r.created_at.isoformat(),
            }
            for r in requests
        ],
    }
