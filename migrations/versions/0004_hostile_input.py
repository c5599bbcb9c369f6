"""hostile input: event ids scoped by tenant and collection, rejected event ids, cache last use

Revision ID: 0004
Revises: 0003

`seen_events` is keyed by (tenant, collection, event_id): one tenant's id no longer drops another
tenant's event. Existing keys take the tenant and collection of a document that carries the same
`event_id`; the others (delivery keys among them) get empty strings, which no new event matches,
and expire with the retention window. `embedding_cache.last_used_at` starts at `created_at`.
Downgrading keeps one key per `event_id`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_FILL_FROM_DOCUMENTS = """
UPDATE seen_events SET
  tenant = COALESCE((SELECT MIN(d.tenant) FROM documents d WHERE d.event_id = seen_events.event_id), ''),
  collection = COALESCE(
    (SELECT MIN(d.collection) FROM documents d
     WHERE d.event_id = seen_events.event_id
       AND d.tenant = (SELECT MIN(e.tenant) FROM documents e WHERE e.event_id = seen_events.event_id)),
    '')
"""

_KEEP_ONE_PER_EVENT_ID = """
DELETE FROM seen_events WHERE EXISTS (
  SELECT 1 FROM seen_events o
  WHERE o.event_id = seen_events.event_id
    AND (o.tenant < seen_events.tenant
         OR (o.tenant = seen_events.tenant AND o.collection < seen_events.collection)))
"""


def upgrade() -> None:
    with op.batch_alter_table("seen_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tenant", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("collection", sa.String(length=64), nullable=True))
    op.execute(_FILL_FROM_DOCUMENTS)
    with op.batch_alter_table("seen_events", schema=None) as batch_op:
        batch_op.alter_column("tenant", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("collection", existing_type=sa.String(length=64), nullable=False)
        batch_op.drop_constraint("pk_seen_events", type_="primary")
        batch_op.create_primary_key("pk_seen_events", ["tenant", "collection", "event_id"])
        batch_op.create_index(batch_op.f("ix_seen_events_received_at"), ["received_at"], unique=False)

    with op.batch_alter_table("rejected_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("event_id", sa.String(length=256), nullable=True))

    with op.batch_alter_table("embedding_cache", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE embedding_cache SET last_used_at = created_at")
    with op.batch_alter_table("embedding_cache", schema=None) as batch_op:
        batch_op.alter_column("last_used_at", existing_type=sa.DateTime(timezone=True), nullable=False)
        batch_op.create_index(batch_op.f("ix_embedding_cache_last_used_at"), ["last_used_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("embedding_cache", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_embedding_cache_last_used_at"))
        batch_op.drop_column("last_used_at")

    with op.batch_alter_table("rejected_events", schema=None) as batch_op:
        batch_op.drop_column("event_id")

    op.execute(_KEEP_ONE_PER_EVENT_ID)
    with op.batch_alter_table("seen_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_seen_events_received_at"))
        batch_op.drop_constraint("pk_seen_events", type_="primary")
        batch_op.create_primary_key("pk_seen_events", ["event_id"])
        batch_op.drop_column("collection")
        batch_op.drop_column("tenant")
