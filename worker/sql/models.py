"""SQL tables: desired state, ledger, embedding cache, rejects, pauses, budget caps and counters.

Every schema change is an Alembic revision in migrations/versions/; tests/test_migrations.py
checks that autogenerate finds no difference from these models.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Integer primary keys: BIGINT on PostgreSQL, INTEGER (the rowid alias) on SQLite.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def fitted_key(value: str, max_chars: int) -> str:
    """`value` as a key column can hold it: as is when short and clean, else its sha256 (64 hex)."""
    if len(value) <= max_chars and "\x00" not in value and value.isprintable():
        return value
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on both dialects (SQLite stores them naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use worker.sql.models.utcnow()")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: sa.JSON, dt.datetime: UTCDateTime()}


class Document(Base):
    """Desired state of one document: the latest accepted version and how far it got."""

    __tablename__ = "documents"
    __table_args__ = (
        sa.UniqueConstraint("tenant", "collection", "doc_id"),
        sa.Index("ix_documents_status_updated", "status", "updated_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(sa.String(64))
    collection: Mapped[str] = mapped_column(sa.String(64))
    doc_id: Mapped[str] = mapped_column(sa.String(512))
    version: Mapped[int] = mapped_column(sa.BigInteger)
    op: Mapped[str] = mapped_column(sa.String(8))  # upsert | delete
    text: Mapped[str | None] = mapped_column(sa.Text)
    text_hash: Mapped[str | None] = mapped_column(sa.String(64))
    meta: Mapped[dict[str, Any] | None]
    status: Mapped[str] = mapped_column(sa.String(16))  # pending | indexed | deleted | dead
    indexed_version: Mapped[int | None] = mapped_column(sa.BigInteger)
    indexed_hash: Mapped[str | None] = mapped_column(sa.String(64))
    chunk_count: Mapped[int | None]
    attempts: Mapped[int] = mapped_column(default=0)
    lease_owner: Mapped[str | None] = mapped_column(sa.String(128))
    lease_until: Mapped[dt.datetime | None]
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    event_id: Mapped[str | None] = mapped_column(sa.String(256))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # The pending version's lane (DESIGN.md §7): realtime, or batch (worker/batch/).
    lane: Mapped[str] = mapped_column(sa.String(16), default="realtime", server_default="realtime")


class RejectedEvent(Base):
    """An event that broke the contract, kept with its reason (and the event, capped)."""

    __tablename__ = "rejected_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    field: Mapped[str] = mapped_column(sa.String(64))
    reason: Mapped[str] = mapped_column(sa.Text)
    collection: Mapped[str | None] = mapped_column(sa.String(64))
    doc_id: Mapped[str | None] = mapped_column(sa.String(512))
    event_id: Mapped[str | None] = mapped_column(sa.String(256))
    event_json: Mapped[str | None] = mapped_column(sa.Text)


class SeenEvent(Base):
    """Idempotency keys of accepted events (`event_id`, or a delivery's), per tenant and collection."""

    __tablename__ = "seen_events"

    tenant: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    collection: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    event_id: Mapped[str] = mapped_column(sa.String(256), primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


class ProviderRequest(Base):
    """One provider call: written before it is sent, completed after."""

    __tablename__ = "provider_requests"
    # The ledger page filtered by status, newest first (migrations/versions/0010_spend_indexes.py).
    __table_args__ = (sa.Index("ix_provider_requests_status_created", "status", "created_at"),)

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    provider_request_id: Mapped[str | None] = mapped_column(sa.String(128), index=True)
    status: Mapped[str] = mapped_column(sa.String(16))  # sent | succeeded | failed | unknown
    model: Mapped[str] = mapped_column(sa.String(64))
    dimensions: Mapped[int]
    api: Mapped[str] = mapped_column(sa.String(16))
    rows: Mapped[int]
    est_tokens: Mapped[int]
    billed_tokens: Mapped[int | None]
    # Money as integer nano-CNY (1e-9): exact on every dialect, and a token at 0.0005 CNY/1K is 500.
    cost_nano_cny: Mapped[int | None] = mapped_column(sa.BigInteger)
    http_status: Mapped[int | None]
    error_code: Mapped[str | None] = mapped_column(sa.String(64))
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    latency_ms: Mapped[float | None]
    attempt: Mapped[int] = mapped_column(default=1)
    key_fingerprint: Mapped[str | None] = mapped_column(sa.String(32))
    worker: Mapped[str | None] = mapped_column(sa.String(128))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    completed_at: Mapped[dt.datetime | None]
    # What the call was for: realtime | batch (document embedding) | query (a search).
    lane: Mapped[str] = mapped_column(sa.String(16), default="realtime", server_default="realtime")
    # Rows that serve no document (queries) name their collection and tenant here; the others
    # are attributed through their items.
    collection: Mapped[str | None] = mapped_column(sa.String(64))
    tenant: Mapped[str | None] = mapped_column(sa.String(64))
    # A re-embed's spend (worker/reembed/): the physical collection the migration fills.
    migration: Mapped[str | None] = mapped_column(sa.String(200), index=True)


LANES = ("realtime", "batch", "query")


class RequestItem(Base):
    """Which document version and chunk one row of a provider request served."""

    __tablename__ = "provider_request_items"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(
        sa.ForeignKey("provider_requests.id", ondelete="CASCADE"), index=True
    )
    document_id: Mapped[int] = mapped_column(sa.ForeignKey("documents.id"), index=True)
    version: Mapped[int] = mapped_column(sa.BigInteger)
    chunk_index: Mapped[int]
    content_hash: Mapped[str] = mapped_column(sa.String(64))
    est_tokens: Mapped[int]


class CachedEmbedding(Base):
    """Paid-for vectors by content, so unchanged or redelivered text costs nothing again."""

    __tablename__ = "embedding_cache"

    key: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(64))
    dimensions: Mapped[int]
    vector: Mapped[bytes] = mapped_column(sa.LargeBinary)  # float32, little-endian
    sparse: Mapped[dict[str, Any] | None]
    request_id: Mapped[str | None] = mapped_column(sa.String(36))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)  # for retention


class ProviderPause(Base):
    """Embedding paused for every process, with the reason (an account-level provider error)."""

    __tablename__ = "provider_pauses"

    name: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    reason: Mapped[str] = mapped_column(sa.Text)
    since: Mapped[dt.datetime] = mapped_column(default=utcnow)
    until: Mapped[dt.datetime]


class MessageAttempt(Base):
    """Deliveries of one broker message that never finished: a message that keeps killing
    workers is dead-lettered after `max_attempts` instead of looping. A key longer than the
    column (a producer's own task id) is stored as its sha256."""

    __tablename__ = "message_attempts"

    task_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    attempts: Mapped[int]
    first_seen: Mapped[dt.datetime] = mapped_column(default=utcnow)


OVERALL = "*"  # the `collection` of an overall cap ('*' never matches a collection name)


class BudgetCap(Base):
    """A spend cap changed through the API; it overrides the settings' cap of the same scope.

    `limit_nano_cny` NULL means "no cap" (an explicit override of a cap from the settings).
    """

    __tablename__ = "budget_caps"

    collection: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    period: Mapped[str] = mapped_column(sa.String(8), primary_key=True)  # day | month
    limit_nano_cny: Mapped[int | None] = mapped_column(sa.BigInteger)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class HourlyCounter(Base):
    """Hourly counters: events by outcome, tokens avoided by dedup and coalescing.

    `bucket` is the UTC hour as text ("2026-11-21T07"), so grouping by hour or day is a prefix
    on both dialects. Empty strings stand for "not applicable" in the label columns.
    """

    __tablename__ = "counters"

    bucket: Mapped[str] = mapped_column(sa.String(13), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(64), primary_key=True, default="")
    collection: Mapped[str] = mapped_column(sa.String(64), primary_key=True, default="")
    tenant: Mapped[str] = mapped_column(sa.String(64), primary_key=True, default="")
    value: Mapped[int] = mapped_column(sa.BigInteger, default=0)
