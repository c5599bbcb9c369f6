"""Settling a cycle's documents in bulk (worker/pipeline.py's finish): the written ones marked
indexed in one statement, those that moved on and those waiting for a fuller batch handed back
in one statement each. The rules are those of the one-document functions in
worker/sql/documents.py: a document is settled only at its claimed version and while its lease
is ours; one that moved on to a newer version while leased is handed back for another round.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from worker.sql.documents import DOCS, Claimed, D

log = logging.getLogger(__name__)
ONE_LESS = sa.case((D.attempts > 0, D.attempts - 1), else_=0)
UNLEASED: dict[str, Any] = {"lease_owner": None, "lease_until": None}


def finish_many(
    session: Session, written: list[tuple[Claimed, int]], waiting: list[Claimed], *, owner: str
) -> list[Claimed]:
    """Mark the `written` documents (with their chunk counts) indexed; hand back the `waiting`
    ones untouched (not an attempt). Returns the documents marked indexed."""
    indexed = mark_indexed_many(session, written, owner=owner)
    moved_on = [doc.id for doc, _ in written if doc.id not in indexed]
    _hand_back(session, moved_on, owner, attempts=0)  # a newer version gets its own tries
    _hand_back(session, [doc.id for doc in waiting], owner, attempts=ONE_LESS)
    return [doc for doc, _ in written if doc.id in indexed]


def mark_indexed_many(session: Session, written: list[tuple[Claimed, int]], *, owner: str) -> set[int]:
    """One UPDATE for every (document, chunk count): indexed at its claimed version, if that is
    still its version and the lease is still `owner`'s. Returns the ids it marked."""
    if not written:
        return set()
    if session.get_bind().dialect.name == "postgresql":
        arrays = {
            "ids": [doc.id for doc, _ in written],
            "versions": [doc.version for doc, _ in written],
            "counts": [count for _, count in written],
        }
        return set(session.execute(_MARK_INDEXED_PG, {**arrays, "owner": owner}).scalars())
    chunk_counts = {doc.id: count for doc, count in written}
    statement = (
        sa.update(DOCS)
        .where(
            D.lease_owner == owner,
            sa.tuple_(D.id, D.version).in_([(doc.id, doc.version) for doc, _ in written]),
        )
        .values(
            status="indexed",
            indexed_version=D.version,  # the claimed version: the WHERE clause holds it
            indexed_hash=D.text_hash,  # unchanged while the version is
            chunk_count=sa.case(chunk_counts, value=D.id),
            attempts=0,
            last_error=None,
            **UNLEASED,
        )
        .returning(D.id)
    )
    return set(session.execute(statement).scalars())


# PostgreSQL: the same UPDATE with the documents as one array per column, so its text is the same
# whatever their number (SQLAlchemy builds and psycopg parses it once; the statement above,
# rebuilt each cycle with a value list as long as the cycle, was a twentieth of a worker's CPU).
_MARK_INDEXED_PG = sa.text(
    "UPDATE documents SET status = 'indexed', indexed_version = documents.version,"
    " indexed_hash = documents.text_hash, chunk_count = w.w_count, attempts = 0, last_error = NULL,"
    " lease_owner = NULL, lease_until = NULL"
    " FROM unnest(CAST(:ids AS BIGINT[]), CAST(:versions AS BIGINT[]), CAST(:counts AS INTEGER[]))"
    " AS w(w_id, w_version, w_count)"
    " WHERE documents.id = w.w_id AND documents.version = w.w_version AND documents.lease_owner = :owner"
    " RETURNING documents.id"
)


def _hand_back(session: Session, ids: list[int], owner: str, *, attempts: Any) -> None:
    if ids:
        session.execute(
            sa.update(DOCS).where(D.id.in_(ids), D.lease_owner == owner).values(attempts=attempts, **UNLEASED)
        )


def release_failed(sessions: sessionmaker[Session], ids: list[int], *, owner: str) -> None:
    """Hand back at once the documents of a cycle that failed (a deadlock, SQL or the store gone)
    that are still leased to `owner`, their attempts counted, instead of leaving them until the
    lease runs out. Best effort: when this fails too, the lease's expiry hands them back."""
    try:
        with sessions.begin() as session:
            _hand_back(session, ids, owner, attempts=D.attempts)
    except Exception as exc:
        log.warning("cycle.release_failed error=%s", type(exc).__name__)
