"""Dead letters: documents that gave up (status `dead`), listed and sent back for another try."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.sql.engines import changed_rows
from worker.sql.models import Document, utcnow


def list_dead(session: Session, *, after_id: int = 0, limit: int = 100) -> list[dict[str, Any]]:
    """Dead documents by id, `limit` at a time after `after_id`."""
    rows = session.execute(
        sa.select(
            Document.id,
            Document.tenant,
            Document.collection,
            Document.doc_id,
            Document.version,
            Document.last_error,
            Document.attempts,
            Document.updated_at,
        )
        .where(Document.status == "dead", Document.id > after_id)
        .order_by(Document.id)
        .limit(limit)
    ).all()
    return [
        {
            "id": r.id,
            "tenant": r.tenant,
            "collection": r.collection,
            "doc_id": r.doc_id,
            "version": r.version,
            "last_error": r.last_error,
            "attempts": r.attempts,
            "updated_at": r.updated_at.isoformat(),
        }
        for r in rows
    ]


def retry_dead(session: Session, document_id: int | None = None) -> int:
    """Back to pending with attempts 0 and no lease: one dead letter, or all when id is None.

    Returns how many documents were sent back (0 when `document_id` is not a dead letter).
    """
    query = sa.update(Document).where(Document.status == "dead")
    if document_id is not None:
        query = query.where(Document.id == document_id)
    return changed_rows(
        session,
        query.values(
            status="pending", attempts=0, lease_owner=None, lease_until=None, updated_at=utcnow()
        ).execution_options(synchronize_session=False),
    )
