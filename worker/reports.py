"""Read-only summaries of state and spend, as plain dicts (the CLI and the API print them)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker import state
from worker.catalog import cny_str
from worker.db import ProviderRequest


def status(session: Session) -> dict[str, Any]:
    requests = dict(
        session.execute(
            sa.select(ProviderRequest.status, sa.func.count()).group_by(ProviderRequest.status)
        ).all()
    )
    age = state.oldest_pending_age_s(session)
    return {
        "documents": state.document_counts(session),
        "requests": {k: requests.get(k, 0) for k in ("succeeded", "failed", "unknown", "sent")},
        "oldest_pending_age_s": None if age is None else round(age, 3),
    }


def _day(session: Session) -> sa.ColumnElement[Any]:
    col = ProviderRequest.created_at
    if session.get_bind().dialect.name == "postgresql":
        return sa.func.to_char(sa.func.timezone("UTC", col), "YYYY-MM-DD")
    return sa.func.strftime("%Y-%m-%d", col)


def spend(session: Session) -> dict[str, Any]:
    """Requests, rows, billed tokens and CNY by UTC day and model, with a total."""
    day = _day(session).label("day")
    failed = sa.func.sum(sa.case((ProviderRequest.status != "succeeded", 1), else_=0))
    query = (
        sa.select(
            day,
            ProviderRequest.model,
            sa.func.count().label("requests"),
            failed.label("failed"),
            sa.func.coalesce(sa.func.sum(sa.case((ProviderRequest.status == "succeeded", ProviderRequest.rows), else_=0)), 0),
            sa.func.coalesce(sa.func.sum(ProviderRequest.billed_tokens), 0),
            sa.func.coalesce(sa.func.sum(ProviderRequest.cost_nano_cny), 0),
        )
        .group_by(day, ProviderRequest.model)
        .order_by(day, ProviderRequest.model)
    )
    rows = []
    total = {"requests": 0, "failed": 0, "rows": 0, "tokens": 0, "cost_nano_cny": 0}
    for day_, model, requests, failed_, rows_, tokens_, nano in session.execute(query):
        row = {"day": day_, "model": model, "requests": requests, "failed": int(failed_ or 0),
               "rows": int(rows_), "tokens": int(tokens_), "cost_nano_cny": int(nano)}
        rows.append(row)
        for key in total:
            total[key] += row[key]
    return {"total": _money(total), "rows": [_money(r) for r in rows]}


def _money(row: dict[str, Any]) -> dict[str, Any]:
    """Add `cost_cny` as a decimal string (JSON has no decimals; floats are never used)."""
    return {**row, "cost_cny": cny_str(row["cost_nano_cny"])}
