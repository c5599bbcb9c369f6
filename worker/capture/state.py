"""Per-source state in SQL (`capture_sources`): position, lag, rows per second, errors.

The capture process writes it after each committed batch (`record_batch`), on each error
(`record_error`) and while idle (`heartbeat`); `report` reads it for `sidecar status`, /metrics,
/readyz and GET /v1/sources. Each function takes a Session and leaves the commit to the caller.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.events import escape_unstorable
from worker.sql.engines import insert_ignore
from worker.sql.models import utcnow
from worker.sql.source_models import CaptureSource

RATE_WINDOW_S = 10.0  # rows per second over windows of about this long
UP_AFTER_S = 60.0  # a source is up while its process wrote a heartbeat this recently
MAX_ERROR_CHARS = 1000


def source_row(session: Session, name: str, kind: str) -> CaptureSource:
    """The source's row, created on first use; locked for this transaction where the dialect can."""
    insert_ignore(session, CaptureSource, {"name": name, "kind": kind, "phase": "snapshot"})
    row = session.execute(sa.select(CaptureSource).filter_by(name=name).with_for_update()).scalar_one()
    row.kind = kind
    return row


def record_batch(
    session: Session,
    row: CaptureSource,
    *,
    rows: int,
    rejected: int,
    position: str | None,
    lag_s: float | None = None,
    process: str | None = None,
) -> None:
    now = utcnow()
    row.rows_total += rows
    row.rejected_total += rejected
    row.window_rows += rows
    elapsed_s = (now - row.window_started_at).total_seconds()
    if elapsed_s >= RATE_WINDOW_S:
        row.rows_per_s = row.window_rows / elapsed_s
        row.window_rows, row.window_started_at = 0, now
    if position is not None:
        row.position = position
    if lag_s is not None:
        row.lag_s = max(0.0, lag_s)
    row.process = process or row.process
    row.heartbeat_at = now


def heartbeat(session: Session, row: CaptureSource, *, lag_bytes: int | None, lag_s: float | None) -> None:
    """Idle or measuring: lag now, and the rate decays to what the last window held."""
    now = utcnow()
    elapsed_s = (now - row.window_started_at).total_seconds()
    if elapsed_s >= RATE_WINDOW_S:
        row.rows_per_s = row.window_rows / elapsed_s
        row.window_rows, row.window_started_at = 0, now
    if lag_bytes is not None:
        row.lag_bytes = max(0, lag_bytes)
    if lag_s is not None:
        row.lag_s = max(0.0, lag_s)
    row.heartbeat_at = now


def record_error(session: Session, name: str, kind: str, error: str) -> None:
    row = source_row(session, name, kind)
    row.errors_total += 1
    row.last_error = escape_unstorable(error, MAX_ERROR_CHARS)
    row.last_error_at = utcnow()


def forget(session: Session, name: str) -> bool:
    """Remove a source's row (after its slot was dropped); True if there was one."""
    found = session.get(CaptureSource, name)
    if found is not None:
        session.delete(found)
    return found is not None


def report(session: Session, *, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Every source as plain JSON-able values, by name."""
    now = now or utcnow()
    rows = session.execute(sa.select(CaptureSource).order_by(CaptureSource.name)).scalars().all()
    return [
        {
            "name": r.name,
            "kind": r.kind,
            "phase": r.phase,
            "up": (now - r.heartbeat_at).total_seconds() <= UP_AFTER_S,
            "position": r.position,
            "lag_bytes": r.lag_bytes,
            "lag_s": None if r.lag_s is None else round(r.lag_s, 3),
            "rows_total": r.rows_total,
            "rows_per_s": round(r.rows_per_s, 2),
            "rejected_total": r.rejected_total,
            "errors_total": r.errors_total,
            "last_error": r.last_error,
            "last_error_at": r.last_error_at.isoformat() if r.last_error_at else None,
            "heartbeat_at": r.heartbeat_at.isoformat(),
        }
        for r in rows
    ]


def lagging(sources: list[dict[str, Any]], *, max_lag_s: float, max_lag_bytes: int) -> list[str]:
    """Why sources are not keeping up (for /readyz): one reason per source past a threshold."""
    reasons = []
    for s in sources:
        if not s["up"]:
            reasons.append(f"source {s['name']}: capture not running (no heartbeat)")
        elif s["lag_s"] is not None and s["lag_s"] > max_lag_s:
            reasons.append(f"source {s['name']}: {s['lag_s']:.0f}s behind (threshold {max_lag_s:.0f}s)")
        elif s["lag_bytes"] is not None and s["lag_bytes"] > max_lag_bytes:
            reasons.append(
                f"source {s['name']}: slot holds {s['lag_bytes']} bytes of WAL (threshold {max_lag_bytes})"
            )
    return reasons
