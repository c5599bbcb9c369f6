"""query lane: what each provider request was for, and the collection of a search

Revision ID: 0005
Revises: 0004

`provider_requests.lane` is `realtime` (the default, and every existing row), `batch` or `query`.
`collection` and `tenant` name what a request serving no document (a search query) was for;
document rows leave them NULL and are attributed through their items.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("provider_requests", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("lane", sa.String(length=16), server_default="realtime", nullable=False)
        )
        batch_op.add_column(sa.Column("collection", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("tenant", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("provider_requests", schema=None) as batch_op:
        batch_op.drop_column("tenant")
        batch_op.drop_column("collection")
        batch_op.drop_column("lane")
