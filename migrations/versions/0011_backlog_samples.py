"""console: backlog history, one row per UTC minute (issue 13)

Revision ID: 0011
Revises: 0010

`backlog_samples` (worker/sql/backlog_models.py): the pending and dead document counts and the
oldest pending document's age at each minute the embedding loop sampled. A new table only.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backlog_samples",
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("pending", sa.Integer(), nullable=False),
        sa.Column("dead", sa.Integer(), nullable=False),
        sa.Column("oldest_pending_age_s", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("minute", name=op.f("pk_backlog_samples")),
    )


def downgrade() -> None:
    op.drop_table("backlog_samples")
