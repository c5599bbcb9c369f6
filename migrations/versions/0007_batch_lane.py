"""batch lane: documents.lane, batch jobs and their lines (issue 11)

Revision ID: 0007
Revises: 0006

`documents.lane` is the pending version's lane (`realtime`, the default and every existing row,
or `batch`). `batch_jobs`, `batch_lines` and `batch_documents` record a provider batch job before
it is uploaded (worker/sql/batch_models.py).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from worker.sql.models import BigId, UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("lane", sa.String(length=16), server_default="realtime", nullable=False)
        )
    op.create_table(
        "batch_jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("dimensions", sa.Integer(), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("est_tokens", sa.Integer(), nullable=False),
        sa.Column("input_file_id", sa.String(length=128), nullable=True),
        sa.Column("provider_batch_id", sa.String(length=128), nullable=True),
        sa.Column("provider_status", sa.String(length=32), nullable=True),
        sa.Column("output_file_id", sa.String(length=128), nullable=True),
        sa.Column("error_file_id", sa.String(length=128), nullable=True),
        sa.Column("completed_lines", sa.Integer(), nullable=False),
        sa.Column("failed_lines", sa.Integer(), nullable=False),
        sa.Column("billed_tokens", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
        sa.Column("due_at", UTCDateTime(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("submitted_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batch_jobs")),
    )
    op.create_index("ix_batch_jobs_state_due", "batch_jobs", ["state", "due_at"], unique=False)
    op.create_table(
        "batch_lines",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("custom_id", sa.String(length=64), nullable=False),
        sa.Column("cache_key", sa.String(length=64), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("est_tokens", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("provider_request_id", sa.String(length=128), nullable=True),
        sa.Column("billed_tokens", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["batch_jobs.id"], name=op.f("fk_batch_lines_job_id_batch_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batch_lines")),
        sa.UniqueConstraint("job_id", "custom_id", name=op.f("uq_batch_lines_job_id_custom_id")),
    )
    op.create_index(op.f("ix_batch_lines_job_id"), "batch_lines", ["job_id"], unique=False)
    op.create_index(
        op.f("ix_batch_lines_provider_request_id"), "batch_lines", ["provider_request_id"], unique=False
    )
    op.create_table(
        "batch_documents",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("document_id", BigId, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["document_id"], ["documents.id"], name=op.f("fk_batch_documents_document_id_documents")
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["batch_jobs.id"],
            name=op.f("fk_batch_documents_job_id_batch_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("job_id", "document_id", name=op.f("pk_batch_documents")),
    )
    op.create_index(op.f("ix_batch_documents_document_id"), "batch_documents", ["document_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_batch_documents_document_id"), table_name="batch_documents")
    op.drop_table("batch_documents")
    op.drop_index(op.f("ix_batch_lines_provider_request_id"), table_name="batch_lines")
    op.drop_index(op.f("ix_batch_lines_job_id"), table_name="batch_lines")
    op.drop_table("batch_lines")
    op.drop_index("ix_batch_jobs_state_due", table_name="batch_jobs")
    op.drop_table("batch_jobs")
    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.drop_column("lane")
