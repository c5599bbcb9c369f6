"""aliases and re-embedding: collection models, migrations, marks, ledger attribution (issue 11)

Revision ID: 0008
Revises: 0007

`collection_models` maps each collection (an alias) to its model, size and physical collection;
`reembed_migrations` and `reembed_marks` record `sidecar reembed` runs (worker/sql/reembed_models.py).
`provider_requests.migration` names the migration a request's spend belongs to (NULL for the rest).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from worker.sql.models import BigId, UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "collection_models",
        sa.Column("collection", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("dimensions", sa.Integer(), nullable=False),
        sa.Column("physical", sa.String(length=200), nullable=False),
        sa.Column("counter", sa.Integer(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("collection", name=op.f("pk_collection_models")),
    )
    op.create_table(
        "reembed_migrations",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("collection", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("requested", sa.String(length=16), nullable=True),
        sa.Column("lane", sa.String(length=16), nullable=False),
        sa.Column("from_physical", sa.String(length=200), nullable=False),
        sa.Column("from_model", sa.String(length=64), nullable=False),
        sa.Column("from_dimensions", sa.Integer(), nullable=False),
        sa.Column("legacy", sa.String(length=200), nullable=True),
        sa.Column("to_physical", sa.String(length=200), nullable=False),
        sa.Column("to_model", sa.String(length=64), nullable=False),
        sa.Column("to_dimensions", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("switched_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reembed_migrations")),
    )
    op.create_index(
        op.f("ix_reembed_migrations_collection"), "reembed_migrations", ["collection"], unique=False
    )
    op.create_table(
        "reembed_marks",
        sa.Column("migration_id", BigId, nullable=False),
        sa.Column("side", sa.String(length=4), nullable=False),
        sa.Column("document_id", BigId, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["document_id"], ["documents.id"], name=op.f("fk_reembed_marks_document_id_documents")
        ),
        sa.ForeignKeyConstraint(
            ["migration_id"],
            ["reembed_migrations.id"],
            name=op.f("fk_reembed_marks_migration_id_reembed_migrations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("migration_id", "side", "document_id", name=op.f("pk_reembed_marks")),
    )
    with op.batch_alter_table("provider_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("migration", sa.String(length=200), nullable=True))
        batch_op.create_index(batch_op.f("ix_provider_requests_migration"), ["migration"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("provider_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_provider_requests_migration"))
        batch_op.drop_column("migration")
    op.drop_table("reembed_marks")
    op.drop_index(op.f("ix_reembed_migrations_collection"), table_name="reembed_migrations")
    op.drop_table("reembed_migrations")
    op.drop_table("collection_models")
