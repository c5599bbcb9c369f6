"""Roll-ups of the ledger, kept by the database itself so that reading them costs O(roll-up rows).

`provider_request_totals` holds, per (model, lane, status, HTTP status, latency bucket), the
sums over every `provider_requests` row in that state; `provider_request_hourly` the same sums per
(UTC hour of `created_at`, model, lane, status). Triggers on `provider_requests` (created by
migrations/versions/0009_rollups.py) subtract a row's old contribution and add its new one in the
transaction that changes the row, so every writer (the pipeline, the search lane, the
reconciler, `sidecar bill --apply`) keeps them exact with no code of its own. On SQLite they add
to the roll-ups directly; on PostgreSQL they append to `provider_request_deltas` (no row that
every writer must lock), which readers add in and fold into the roll-ups.
worker/ledger/rollups.py reads them.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from worker.sql.models import Base, BigId


class RequestTotal(Base):
    """Sums over the ledger rows currently in one state. `http_status` 0: none recorded;
    `latency_le`: the upper bound of the row's latency bucket in seconds ("0.05" … "60",
    "+Inf"), "" when no latency was recorded."""

    __tablename__ = "provider_request_totals"

    model: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    lane: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    http_status: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    latency_le: Mapped[str] = mapped_column(sa.String(8), primary_key=True)
    requests: Mapped[int] = mapped_column(sa.BigInteger)
    rows: Mapped[int] = mapped_column(sa.BigInteger)
    est_tokens: Mapped[int] = mapped_column(sa.BigInteger)
    billed_tokens: Mapped[int] = mapped_column(sa.BigInteger)
    cost_nano_cny: Mapped[int] = mapped_column(sa.BigInteger)
    latency_ms_sum: Mapped[float] = mapped_column(sa.Float)


class RequestHour(Base):
    """Sums over the ledger rows created in one UTC hour ("2026-11-21T07", as the `counters`
    table's buckets), by model, lane and status."""

    __tablename__ = "provider_request_hourly"

    bucket: Mapped[str] = mapped_column(sa.String(13), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    lane: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    requests: Mapped[int] = mapped_column(sa.BigInteger)
    rows: Mapped[int] = mapped_column(sa.BigInteger)
    est_tokens: Mapped[int] = mapped_column(sa.BigInteger)
    billed_tokens: Mapped[int] = mapped_column(sa.BigInteger)
    cost_nano_cny: Mapped[int] = mapped_column(sa.BigInteger)


class RequestDelta(Base):
    """A change of one ledger row's contribution not yet folded into the roll-ups (PostgreSQL)."""

    __tablename__ = "provider_request_deltas"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    bucket: Mapped[str] = mapped_column(sa.String(13))
    model: Mapped[str] = mapped_column(sa.String(64))
    lane: Mapped[str] = mapped_column(sa.String(16))
    status: Mapped[str] = mapped_column(sa.String(16))
    http_status: Mapped[int] = mapped_column(sa.Integer)
    latency_le: Mapped[str] = mapped_column(sa.String(8))
    requests: Mapped[int] = mapped_column(sa.BigInteger)
    rows: Mapped[int] = mapped_column(sa.BigInteger)
    est_tokens: Mapped[int] = mapped_column(sa.BigInteger)
    billed_tokens: Mapped[int] = mapped_column(sa.BigInteger)
    cost_nano_cny: Mapped[int] = mapped_column(sa.BigInteger)
    latency_ms_sum: Mapped[float] = mapped_column(sa.Float)
