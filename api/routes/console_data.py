"""What the console (api/console/) reads besides the ledger, spend, budget and dead-letter routes.

    GET /v1/status     read token   what `sidecar status --json` prints: documents by status,
                                    requests by outcome, oldest pending age, budget, provider pauses
    GET /v1/activity   read token   backlog now, and throughput and backlog per minute over the last
                                    N minutes

The activity series reads only the ledger rows of the window (an index range on `created_at`,
never the whole ledger) and the hourly `counters` table (events accepted); the backlog comes from
the documents' status index. Minutes with nothing in them are present with zeros, so a chart can
draw the series as it is. The backlog per minute comes from `backlog_samples`
(worker/sql/backlog_models.py), which the embedding loop writes once a minute: a minute nobody
sampled (no worker running) is present with nulls, not zeros.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from api import deps
from api.auth import can_read
from api.deps import session
from worker.ledger import reports
from worker.ledger.counters import EVENT_PREFIX, hour_bucket
from worker.settings import Settings
from worker.sql import documents
from worker.sql.backlog_models import BacklogSample
from worker.sql.models import Document, HourlyCounter, ProviderRequest, utcnow

router = APIRouter()


@router.get("/v1/status", dependencies=[Depends(can_read)], summary="What `sidecar status --json` prints")
def get_status(settings: Settings = Depends(deps.settings), s: Session = Depends(session)) -> dict[str, Any]:
    return reports.status(s, settings)


@router.get("/v1/activity", dependencies=[Depends(can_read)], summary="Backlog now, throughput per minute")
def get_activity(
    minutes: Annotated[int, Query(ge=1, le=360, description="how far back the series goes")] = 60,
    s: Session = Depends(session),
) -> dict[str, Any]:
    """Backlog now (pending documents, the oldest one's age, dead letters) and, per UTC minute over
    the last `minutes`, provider requests, failed ones, rows embedded and billed tokens; events
    accepted per hour over the same span (from the hourly counters); and `backlog_series`, the
    backlog sampled at each minute of the window (pending, dead, oldest_pending_age_s), every
    minute present: one the embedding loop did not sample has null values."""
    now = utcnow()
    start = (now - dt.timedelta(minutes=minutes - 1)).replace(second=0, microsecond=0)
    series = minute_series(s, start, minutes)
    recent = series[-5:]
    return {
        "now": now.isoformat(),
        "backlog": backlog(s),
        "minutes": minutes,
        "series": series,
        "last_5_min": {
            "requests_per_min": round(sum(m["requests"] for m in recent) / len(recent), 2),
            "rows_per_min": round(sum(m["rows"] for m in recent) / len(recent), 2),
            "tokens_per_min": round(sum(m["tokens"] for m in recent) / len(recent), 2),
        },
        "events_accepted_by_hour": events_by_hour(s, start),
        "backlog_series": backlog_series(s, start, minutes),
    }


def backlog(s: Session) -> dict[str, Any]:
    counts = dict(
        s.execute(
            sa.select(Document.status, sa.func.count())
            .where(Document.status.in_(("pending", "dead")))
            .group_by(Document.status)
        ).all()
    )
    age = documents.oldest_pending_age_s(s)
    return {
        "pending": int(counts.get("pending", 0)),
        "dead": int(counts.get("dead", 0)),
        "oldest_pending_age_s": None if age is None else round(age, 3),
    }


def minute_key(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%MZ")


def minute_series(s: Session, start: dt.datetime, minutes: int) -> list[dict[str, Any]]:
    pr = ProviderRequest
    bucket = _minute_expr(s, pr.created_at).label("minute")
    query = (
        sa.select(
            bucket,
            sa.func.count(),
            sa.func.sum(sa.case((pr.status != "succeeded", 1), else_=0)),
            sa.func.sum(sa.case((pr.status == "succeeded", pr.rows), else_=0)),
            sa.func.sum(sa.func.coalesce(pr.billed_tokens, 0)),
        )
        .where(pr.created_at >= start)
        .group_by(bucket)
    )
    found = {f"{minute}Z": row for minute, *row in s.execute(query)}
    series = []
    for i in range(minutes):
        key = minute_key(start + dt.timedelta(minutes=i))
        requests, failed, rows, tokens = found.get(key, (0, 0, 0, 0))
        series.append(
            {
                "minute": key,
                "requests": int(requests or 0),
                "failed": int(failed or 0),
                "rows": int(rows or 0),
                "tokens": int(tokens or 0),
            }
        )
    return series


def backlog_series(s: Session, start: dt.datetime, minutes: int) -> list[dict[str, Any]]:
    """One entry per minute from `start`; nulls where no sample was written."""
    b = BacklogSample
    query = sa.select(b.minute, b.pending, b.dead, b.oldest_pending_age_s).where(b.minute >= start)
    found = {minute_key(minute): row for minute, *row in s.execute(query)}
    series = []
    for i in range(minutes):
        key = minute_key(start + dt.timedelta(minutes=i))
        pending, dead, age = found.get(key, (None, None, None))
        series.append({"minute": key, "pending": pending, "dead": dead, "oldest_pending_age_s": age})
    return series


def events_by_hour(s: Session, start: dt.datetime) -> list[dict[str, Any]]:
    c = HourlyCounter
    query = (
        sa.select(c.bucket, c.name, sa.func.sum(c.value))
        .where(c.name.like(f"{EVENT_PREFIX}%"), c.bucket >= hour_bucket(start))
        .group_by(c.bucket, c.name)
        .order_by(c.bucket)
    )
    hours: dict[str, dict[str, Any]] = {}
    for bucket, name, value in s.execute(query):
        hours.setdefault(bucket, {"hour": f"{bucket}:00Z"})[name.removeprefix(EVENT_PREFIX)] = int(value or 0)
    return list(hours.values())


def _minute_expr(s: Session, col: Any) -> sa.ColumnElement[str]:
    """UTC minute of a timestamp column as text: 2026-11-21T07:05."""
    if s.get_bind().dialect.name == "postgresql":
        return sa.func.to_char(sa.func.timezone("UTC", col), 'YYYY-MM-DD"T"HH24:MI')
    return sa.func.strftime("%Y-%m-%dT%H:%M", col)
