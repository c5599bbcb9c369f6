"""Tables of the batch lane (worker/batch/): batch jobs, their lines and the documents they serve.

A job is written whole, in the transaction that leases its documents and opens its ledger row,
before anything is uploaded; its `id` is that ledger row's id (`provider_requests.id`). A line is
one text (one distinct chunk); the documents it serves are found by content hash through the
job's documents.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from worker.sql.models import Base, BigId, utcnow


class BatchJob(Base):
    """One provider batch job and how far it got:
    packed → uploaded → submitted → imported → done (or failed, when nothing could be sent)."""

    __tablename__ = "batch_jobs"
    __table_args__ = (sa.Index("ix_batch_jobs_state_due", "state", "due_at"),)

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    state: Mapped[str] = mapped_column(sa.String(16))
    model: Mapped[str] = mapped_column(sa.String(64))
    dimensions: Mapped[int]
    lines: Mapped[int]
    est_tokens: Mapped[int]
    input_file_id: Mapped[str | None] = mapped_column(sa.String(128))
    provider_batch_id: Mapped[str | None] = mapped_column(sa.String(128))
    provider_status: Mapped[str | None] = mapped_column(sa.String(32))
    output_file_id: Mapped[str | None] = mapped_column(sa.String(128))
    error_file_id: Mapped[str | None] = mapped_column(sa.String(128))
    completed_lines: Mapped[int] = mapped_column(default=0)
    failed_lines: Mapped[int] = mapped_column(default=0)
    billed_tokens: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    lease_owner: Mapped[str | None] = mapped_column(sa.String(128))
    lease_until: Mapped[dt.datetime | None]
    due_at: Mapped[dt.datetime] = mapped_column(default=utcnow)  # next step or poll
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    submitted_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]


class BatchLine(Base):
    """One line of a job's input file: one distinct text, and what the provider answered for it."""

    __tablename__ = "batch_lines"
    __table_args__ = (sa.UniqueConstraint("job_id", "custom_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("batch_jobs.id", ondelete="CASCADE"), index=True)
    custom_id: Mapped[str] = mapped_column(sa.String(64))
    cache_key: Mapped[str] = mapped_column(sa.String(64))
    content_hash: Mapped[str] = mapped_column(sa.String(64))
    text: Mapped[str | None] = mapped_column(sa.Text)  # dropped once the line is answered
    est_tokens: Mapped[int]
    status: Mapped[str] = mapped_column(sa.String(16), default="pending")  # pending | succeeded | failed
    provider_request_id: Mapped[str | None] = mapped_column(sa.String(128), index=True)
    billed_tokens: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(sa.Text)


class BatchDocument(Base):
    """A document version a job serves (its lease owner is the job while the job runs)."""

    __tablename__ = "batch_documents"

    job_id: Mapped[str] = mapped_column(sa.ForeignKey("batch_jobs.id", ondelete="CASCADE"), primary_key=True)
    document_id: Mapped[int] = mapped_column(sa.ForeignKey("documents.id"), primary_key=True, index=True)
    version: Mapped[int] = mapped_column(sa.BigInteger)
