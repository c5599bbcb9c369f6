"""Retention: bookkeeping rows past their window are deleted, one bounded batch at a time.

    seen_events        idempotency keys of accepted events   retention_seen_events_days   received_at
    rejected_events    rejected events and messages          retention_rejected_days      received_at
    message_attempts   deliveries that never finished        retention_attempts_days      first_seen
    embedding_cache    vectors not used for a while          retention_cache_days         last_used_at
    backlog_samples    the console's backlog per minute      retention_backlog_days       minute

A window of 0 keeps the rows forever. Documents and the spend ledger are never pruned. The
reconciler's periodic pass calls `prune`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import InstrumentedAttribute, Session

from worker.settings import Settings
from worker.sql.backlog_models import BacklogSample
from worker.sql.engines import changed_rows
from worker.sql.models import Base, CachedEmbedding, MessageAttempt, RejectedEvent, SeenEvent

BATCH_ROWS = 1000  # rows deleted per transaction
MAX_BATCHES = 50  # per table and call; the next pass goes on where this one stopped


@dataclass(frozen=True)
class Window:
    table: type[Base]
    stamp: InstrumentedAttribute[dt.datetime]  # the row's age is measured from this column
    days: float


def windows(settings: Settings) -> list[Window]:
    return [
        Window(SeenEvent, SeenEvent.received_at, settings.retention_seen_events_days),
        Window(RejectedEvent, RejectedEvent.received_at, settings.retention_rejected_days),
        Window(MessageAttempt, MessageAttempt.first_seen, settings.retention_attempts_days),
        Window(CachedEmbedding, CachedEmbedding.last_used_at, settings.retention_cache_days),
        Window(BacklogSample, BacklogSample.minute, settings.retention_backlog_days),
    ]


def prune(
    session: Session, settings: Settings, now: dt.datetime, *, batch_rows: int = BATCH_ROWS
) -> dict[str, int]:
    """Delete rows older than their window; returns how many went, by table.

    `session` names the database only: each batch is a short transaction of its own on the same
    engine, so no lock is held from one batch to the next (and none while the caller waits)."""
    bind = session.get_bind()
    pruned: dict[str, int] = {}
    for window in windows(settings):
        if window.days > 0:
            cutoff = now - dt.timedelta(days=window.days)
            pruned[window.table.__tablename__] = _prune_table(bind, window, cutoff, batch_rows)
    return pruned


def _prune_table(
    bind: sa.Engine | sa.Connection, window: Window, cutoff: dt.datetime, batch_rows: int
) -> int:
    key = sa.tuple_(*sa.inspect(window.table).primary_key)
    oldest = sa.select(*sa.inspect(window.table).primary_key).where(window.stamp < cutoff).limit(batch_rows)
    total = 0
    for _ in range(MAX_BATCHES):
        with Session(bind) as batch, batch.begin():
            deleted = changed_rows(
                batch,
                sa.delete(window.table).where(key.in_(oldest)).execution_options(synchronize_session=False),
            )
        total += deleted
        if deleted < batch_rows:
            break
    return total
