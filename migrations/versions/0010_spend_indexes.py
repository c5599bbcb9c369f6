"""console: an index for the ledger page by status (issue 13)

Revision ID: 0010
Revises: 0009

`ix_provider_requests_status_created` on (status, created_at): the ledger page filtered by status
(worker/ledger/reports.py `requests_page`) reads the newest rows of that status from the index
instead of scanning the ledger for them. An index only: `provider_requests` is not rebuilt, so
the triggers of 0009 stay.
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_provider_requests_status_created", "provider_requests", ["status", "created_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_provider_requests_status_created", table_name="provider_requests")
