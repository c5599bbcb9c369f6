"""Backlog history: one row per UTC minute with the backlog as it was then (issue 13).

`backlog_samples` is written by the embedding loop (worker/service.py `EmbedService`) at most
once per minute per process, with INSERT … ON CONFLICT DO NOTHING on the minute: several
processes sampling the same minute keep the first row, so the table holds one row per minute
per deployment. `GET /v1/activity` (api/routes/console_data.py) reads it as `backlog_series`;
retention (worker/sql/retention.py, `retention_backlog_days`) prunes old minutes.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, Session, mapped_column

from worker.sql import documents
from worker.sql.engines import insert_ignore
from worker.sql.models import Base, utcnow


class BacklogSample(Base):
    """The backlog at the start of one UTC minute (`minute`: seconds and microseconds zero)."""

    __tablename__ = "backlog_samples"

    minute: Mapped[dt.datetime] = mapped_column(primary_key=True)
    pending: Mapped[int]
    dead: Mapped[int]
    oldest_pending_age_s: Mapped[float | None] = mapped_column(sa.Float)


def minute_of(at: dt.datetime) -> dt.datetime:
    """The UTC minute `at` falls in."""
    return at.astimezone(dt.UTC).replace(second=0, microsecond=0)


def record_sample(session: Session, now: dt.datetime | None = None) -> bool:
    """Insert the backlog of `now`'s minute unless that minute has a row already; True if it
    went in. Two queries (document counts, oldest pending) and one insert; the caller commits."""
    counts = documents.document_counts(session)
    age = documents.oldest_pending_age_s(session)
    row = {
        "minute": minute_of(now or utcnow()),
        "pending": counts["pending"],
        "dead": counts["dead"],
        "oldest_pending_age_s": None if age is None else round(age, 3),
    }
    return insert_ignore(session, BacklogSample, row) > 0
