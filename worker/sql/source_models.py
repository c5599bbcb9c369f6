"""Tables of change capture (worker/capture/): per-source state."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from worker.sql.models import Base, utcnow


class CaptureSource(Base):
    """One source of the sources file (`sidecar capture --sources`): position, lag, errors.

    Written by `sidecar capture` after each committed batch and on each error; read by `sidecar
    status`, /metrics, /readyz and GET /v1/sources. `phase` is `snapshot` until the first
    snapshot is committed (a capture killed before that takes it again), then `streaming`."""

    __tablename__ = "capture_sources"

    name: Mapped[str] = mapped_column(sa.String(48), primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(16))  # postgres | debezium
    phase: Mapped[str] = mapped_column(sa.String(16), default="snapshot")
    position: Mapped[str | None] = mapped_column(sa.String(64))  # LSN 0/16B3748, or a stream entry id
    consistent_point: Mapped[int | None] = mapped_column(sa.BigInteger)  # the snapshot's version
    rows_total: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    rejected_total: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    errors_total: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    rows_per_s: Mapped[float] = mapped_column(sa.Float, default=0.0)
    window_rows: Mapped[int] = mapped_column(sa.BigInteger, default=0)  # rows since window_started_at
    window_started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    lag_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    lag_s: Mapped[float | None] = mapped_column(sa.Float)
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    last_error_at: Mapped[dt.datetime | None] = mapped_column()
    process: Mapped[str | None] = mapped_column(sa.String(128))
    heartbeat_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
