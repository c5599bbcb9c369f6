"""Tables of aliases and re-embedding (worker/reembed/): each collection's model and physical
collection, its migrations to another model, and what the follower wrote where."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from worker.sql.models import Base, BigId, utcnow


class CollectionModel(Base):
    """The model that embeds a collection, and the physical collection its alias points at.

    `physical` equals `collection` for a plain collection made before aliases (switched over by
    its first re-embed). `counter` is the `n` of the newest physical name handed out."""

    __tablename__ = "collection_models"

    collection: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(64))
    dimensions: Mapped[int]
    physical: Mapped[str] = mapped_column(sa.String(200))
    counter: Mapped[int] = mapped_column(default=1)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Migration(Base):
    """One re-embed of a collection: backfilling → validating → switched → finalized, or
    rolled_back. `requested` is what an operator asked for and the runner has yet to do
    (`rollback`, `finalize`). The lease makes one runner at a time advance it."""

    __tablename__ = "reembed_migrations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    collection: Mapped[str] = mapped_column(sa.String(64), index=True)
    state: Mapped[str] = mapped_column(sa.String(16))
    requested: Mapped[str | None] = mapped_column(sa.String(16))
    lane: Mapped[str] = mapped_column(sa.String(16), default="realtime")
    from_physical: Mapped[str] = mapped_column(sa.String(200))
    from_model: Mapped[str] = mapped_column(sa.String(64))
    from_dimensions: Mapped[int]
    legacy: Mapped[str | None] = mapped_column(sa.String(200))  # the plain collection replaced at the switch
    to_physical: Mapped[str] = mapped_column(sa.String(200))
    to_model: Mapped[str] = mapped_column(sa.String(64))
    to_dimensions: Mapped[int]
    lease_owner: Mapped[str | None] = mapped_column(sa.String(128))
    lease_until: Mapped[dt.datetime | None]
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    switched_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]


class MigrationMark(Base):
    """The version of a document the follower last brought into one side (`to` or `from`) of a
    migration: a written version or a tombstone. Deleted when the migration ends."""

    __tablename__ = "reembed_marks"

    migration_id: Mapped[int] = mapped_column(
        BigId, sa.ForeignKey("reembed_migrations.id", ondelete="CASCADE"), primary_key=True
    )
    side: Mapped[str] = mapped_column(sa.String(4), primary_key=True)  # to | from
    document_id: Mapped[int] = mapped_column(BigId, sa.ForeignKey("documents.id"), primary_key=True)
    version: Mapped[int] = mapped_column(sa.BigInteger)
