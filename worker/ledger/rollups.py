"""The ledger's roll-ups, read in O(roll-up rows): totals by model, lane and status with the
provider latency histogram (for /metrics), requests by status, and spend in a window of whole UTC
hours (the budget's overall caps: the same figure as worker/ledger/spent.py `spent_overall`, in
O(hours) instead of O(ledger rows in the window)). The database keeps them
(worker/sql/rollup_models.py explains how); on PostgreSQL each read adds the deltas not folded
yet, and `fold` moves those into the roll-ups (a scrape of /metrics does, then commits).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.catalog import MODELS
from worker.ledger.counters import hour_bucket
from worker.sql.rollup_models import RequestDelta, RequestHour, RequestTotal

# Upper bounds of the latency buckets in seconds, as the triggers of migration 0009 file rows.
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TERMINAL = ("succeeded", "failed", "unknown")  # `sent` is a call in flight
_TOTALS = ("model", "lane", "status", "http_status", "latency_le")
_HOURLY = ("bucket", "model", "lane", "status")
_SUMS = ("requests", "rows", "est_tokens", "billed_tokens", "cost_nano_cny", "latency_ms_sum")


@dataclass
class ModelTotals:
    """What one model's ledger rows add up to (tokens and cost over every status, as billed or
    booked at the estimate)."""

    requests: dict[tuple[str, str], int] = field(default_factory=dict)  # (lane, status) -> n
    rows_embedded: int = 0
    billed_tokens: int = 0
    cost_nano_cny: int = 0
    throttled: int = 0
    latency_buckets: dict[str, int] = field(default_factory=dict)  # le -> requests (not cumulative)
    latency_count: int = 0
    latency_ms_sum: float = 0.0

    def cumulative_latency(self) -> list[tuple[str, int]]:
        """(le, requests at or under it) for every bound, then "+Inf"."""
        out, running = [], 0
        for le in [f"{b:g}" for b in LATENCY_BUCKETS_S] + ["+Inf"]:
            running += self.latency_buckets.get(le, 0)
            out.append((le, running))
        return out


def _with_deltas(table: Any, key: tuple[str, ...], window: tuple[str, str] | None = None) -> sa.Select[Any]:
    """The roll-up's rows plus the pending deltas, summed by `key`; `window`: [since, until) buckets."""
    columns = [*key, *(_SUMS if table is RequestTotal else _SUMS[:-1])]
    parts = []
    for source in (table, RequestDelta):
        part = sa.select(*(getattr(source, c) for c in columns))
        if window is not None:
            part = part.where(source.bucket >= window[0], source.bucket < window[1])
        parts.append(part)
    both = sa.union_all(*parts).subquery()
    sums = [sa.func.sum(both.c[c]).label(c) for c in columns[len(key) :]]
    return sa.select(*(both.c[c] for c in key), *sums).group_by(*(both.c[c] for c in key))


def request_totals(session: Session) -> dict[str, ModelTotals]:
    """Totals per model, from the roll-up (and the deltas not folded yet)."""
    totals: dict[str, ModelTotals] = defaultdict(ModelTotals)
    for model, lane, status, http, le, n, n_rows, _est, tokens, cost, ms in session.execute(
        _with_deltas(RequestTotal, _TOTALS)
    ):
        if not n:
            continue
        m = totals[model]
        m.requests[(lane, status)] = m.requests.get((lane, status), 0) + n
        m.rows_embedded += n_rows if status == "succeeded" else 0
        m.billed_tokens += tokens
        m.cost_nano_cny += cost
        m.throttled += n if http == 429 else 0
        if le:
            m.latency_buckets[le] = m.latency_buckets.get(le, 0) + n
            m.latency_count += n
            m.latency_ms_sum += ms
    return dict(sorted(totals.items()))


def requests_by_status(session: Session) -> dict[str, int]:
    """Ledger rows by status ({"sent": n, "succeeded": n, ...}), as a GROUP BY of the ledger gives."""
    counts: dict[str, int] = defaultdict(int)
    for _model, _lane, status, _http, _le, n, *_ in session.execute(_with_deltas(RequestTotal, _TOTALS)):
        counts[status] += int(n)
    return {status: n for status, n in counts.items() if n}


def whole_hours(*edges: dt.datetime | None) -> bool:
    """Every edge given is a whole UTC hour (a range the hourly roll-ups cover exactly)."""
    return all(
        e is None
        or (e.tzinfo is not None and e.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0) == e)
        for e in edges
    )


def spent_overall(session: Session, start: dt.datetime, end: dt.datetime) -> int:
    """Nano-CNY spent by requests created in [start, end), both on whole UTC hours: the billed
    cost of finished requests, the estimate (est_tokens at the model's price) of those `sent` or of
    `unknown` outcome, as worker/ledger/spent.py counts it."""
    if not whole_hours(start, end):
        raise ValueError(f"{start.isoformat()}–{end.isoformat()} is not on whole UTC hours")
    window = (hour_bucket(start), hour_bucket(end))
    worst = max(spec.cost_nano_cny(1) for spec in MODELS.values())
    spent = 0
    for _bucket, model, _lane, status, _n, _rows, est_tokens, _tokens, cost in session.execute(
        _with_deltas(RequestHour, _HOURLY, window)
    ):
        if status in ("sent", "unknown"):
            spec = MODELS.get(model)
            spent += int(est_tokens or 0) * (spec.cost_nano_cny(1) if spec else worst)
        else:
            spent += int(cost or 0)
    return spent


def hourly(
    session: Session, since: dt.datetime | None = None, until: dt.datetime | None = None
) -> list[tuple[str, str, str, str, int, int, int, int, int]]:
    """Per UTC hour of creation ("2026-11-21T07"), model, lane and status: requests, rows,
    est_tokens, billed_tokens, cost_nano_cny; hours from `since` to before `until`, rows of zero
    requests left out. For series by hour or day (spend, throughput) in O(hours)."""
    window = (hour_bucket(since) if since else "", hour_bucket(until) if until else "~")
    rows = session.execute(_with_deltas(RequestHour, _HOURLY, window).order_by(*_HOURLY)).all()
    return [tuple(r[:4]) + tuple(int(v) for v in r[4:]) for r in rows if r[4]]


def fold_apart(session: Session) -> int:
    """`fold` in a short transaction of its own, committed, beside `session`'s (PostgreSQL)."""
    bind = session.get_bind()
    if bind.dialect.name != "postgresql":
        return 0
    with Session(bind) as own, own.begin():
        return fold(own)


def fold(session: Session) -> int:
    """Move the pending deltas into the roll-ups (PostgreSQL; SQLite has none), in the caller's
    transaction; returns how many. Roll-up rows are locked in key order, so two folds at once
    queue instead of deadlocking."""
    if session.get_bind().dialect.name != "postgresql":
        return 0
    sums = ", ".join(f"SUM({c}) AS {c}" for c in _SUMS)
    hourly_sums = ", ".join(f"SUM({c}) AS {c}" for c in _SUMS[:-1])

    def upsert(table: str, key: tuple[str, ...], names: tuple[str, ...], summed: str) -> str:
        added = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in names)
        keys = ", ".join(key)
        return (
            f"INSERT INTO {table} ({keys}, {', '.join(names)}) SELECT {keys}, {summed} FROM moved "
            f"GROUP BY {keys} ORDER BY {keys} ON CONFLICT ({keys}) DO UPDATE SET {added}"
        )

    moved = session.execute(
        sa.text(
            f"WITH moved AS (DELETE FROM {RequestDelta.__tablename__} RETURNING *), "
            f"t AS ({upsert(RequestTotal.__tablename__, _TOTALS, _SUMS, sums)}), "
            f"h AS ({upsert(RequestHour.__tablename__, _HOURLY, _SUMS[:-1], hourly_sums)}) "
            "SELECT COUNT(*) FROM moved"
        )
    ).scalar_one()
    return int(moved)
