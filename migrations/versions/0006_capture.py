"""change capture: per-source positions, lag and errors (issue 10)

Revision ID: 0006
Revises: 0005

`capture_sources` holds one row per source of `sidecar capture` (worker/sql/source_models.py).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "capture_sources",
        sa.Column("name", sa.String(length=48), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("position", sa.String(length=64), nullable=True),
        sa.Column("consistent_point", sa.BigInteger(), nullable=True),
        sa.Column("rows_total", sa.BigInteger(), nullable=False),
        sa.Column("rejected_total", sa.BigInteger(), nullable=False),
        sa.Column("errors_total", sa.BigInteger(), nullable=False),
        sa.Column("rows_per_s", sa.Float(), nullable=False),
        sa.Column("window_rows", sa.BigInteger(), nullable=False),
        sa.Column("window_started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lag_bytes", sa.BigInteger(), nullable=True),
        sa.Column("lag_s", sa.Float(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_error_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("process", sa.String(length=128), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_capture_sources")),
    )


def downgrade() -> None:
    op.drop_table("capture_sources")
