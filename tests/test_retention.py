"""Retention: bookkeeping older than its window is deleted in batches; the rest, documents and the
ledger stay; a window of 0 keeps rows forever; a cache entry in use stays young."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from worker.settings import Settings
from worker.sql import cache, engines, retention, schema
from worker.sql.models import CachedEmbedding, Document, MessageAttempt, RejectedEvent, SeenEvent

NOW = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)


def days_ago(days: float) -> dt.datetime:
    return NOW - dt.timedelta(days=days)


@pytest.fixture()
def sessions(database_url):
    schema.upgrade(database_url)
    engine = engines.make_engine(database_url)
    yield engines.make_sessionmaker(engine)
    engine.dispose()


def fill(session, *, ages_days: list[float]) -> None:
    for i, age in enumerate(ages_days):
        at = days_ago(age)
        session.add(SeenEvent(tenant="t", collection="c", event_id=f"e{i}", received_at=at))
        session.add(RejectedEvent(field="op", reason="bad", received_at=at))
        session.add(MessageAttempt(task_id=f"task{i}:0", attempts=1, first_seen=at))
        session.add(
            CachedEmbedding(
                key=f"k{i}", model="m", dimensions=2, vector=b"\0" * 8, created_at=at, last_used_at=at
            )
        )
    session.add(
        Document(
            tenant="t",
            collection="c",
            doc_id="old",
            version=1,
            op="upsert",
            status="indexed",
            created_at=days_ago(999),
            updated_at=days_ago(999),
        )
    )


def count(session, model) -> int:
    return session.execute(sa.select(sa.func.count()).select_from(model)).scalar_one()


def test_prune_deletes_past_each_window_in_batches(sessions):
    settings = Settings(
        _env_file=None,
        retention_seen_events_days=7,
        retention_rejected_days=30,
        retention_attempts_days=2,
        retention_cache_days=90,
    )
    ages = [1, 3, 8, 31, 91, 400, 1.5, 6.9]
    with sessions.begin() as s:
        fill(s, ages_days=ages)
    with sessions.begin() as s:
        pruned = retention.prune(s, settings, NOW, batch_rows=2)
    assert pruned == {
        "seen_events": 4,
        "rejected_events": 3,
        "message_attempts": 6,
        "embedding_cache": 2,
        "backlog_samples": 0,  # fill() writes none (tests/test_console_api.py prunes them)
    }
    with sessions() as s:
        assert count(s, SeenEvent) == 4 and count(s, RejectedEvent) == 5
        assert count(s, MessageAttempt) == 2 and count(s, CachedEmbedding) == 6
        assert count(s, Document) == 1  # documents are never pruned
    with sessions.begin() as s:
        assert retention.prune(s, settings, NOW) == dict.fromkeys(pruned, 0)


def test_a_zero_window_keeps_rows_forever(sessions):
    keep = Settings(
        _env_file=None,
        retention_seen_events_days=0,
        retention_rejected_days=0,
        retention_attempts_days=0,
        retention_cache_days=0,
        retention_backlog_days=0,
    )
    with sessions.begin() as s:
        fill(s, ages_days=[1000])
    with sessions.begin() as s:
        assert retention.prune(s, keep, NOW) == {}
    with sessions() as s:
        assert count(s, SeenEvent) == count(s, CachedEmbedding) == 1


def test_reading_a_cache_entry_keeps_it(sessions):
    settings = Settings(_env_file=None, retention_cache_days=90)
    with sessions.begin() as s:
        fill(s, ages_days=[100, 200])
    with sessions.begin() as s:
        assert set(cache.get_many(s, ["k0"])) == {"k0"}  # used now: young again
    with sessions.begin() as s:
        retention.prune(s, settings, dt.datetime.now(dt.UTC))
    with sessions() as s:
        assert s.execute(sa.select(CachedEmbedding.key)).scalars().all() == ["k0"]
