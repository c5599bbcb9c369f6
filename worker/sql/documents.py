"""Desired state in SQL: rejections, claiming work with leases, finishing it (accepting events,
the version rule: worker/sql/accepting.py).

The broker is a hint, SQL is the truth: an event is acknowledged only after its desired state
(or its rejection) is committed here. Every function takes a Session and leaves the commit to the
caller, so each accept or claim is one short transaction.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.events import MAX_EVENT_ID_CHARS, escape_unstorable
from worker.sql.accepting import accept as accept  # one event (a message's: accept_many)
from worker.sql.engines import changed_rows
from worker.sql.models import Document, RejectedEvent, utcnow

REJECTED_EVENT_MAX_CHARS = 4096  # of the event's JSON, escaped
MAX_REASON_CHARS = 2000


def reject(session: Session, raw: Any, field: str, reason: str) -> None:
    """Keep a malformed event with its reason (and the event itself, escaped and capped).

    Any event can be kept: NUL and lone surrogates become escapes, every column is cut to size."""
    fields: dict[Any, Any] = raw if isinstance(raw, dict) else {}
    session.add(
        RejectedEvent(
            field=escape_unstorable(field, 64) or "event",
            reason=escape_unstorable(reason, MAX_REASON_CHARS),
            doc_id=_column_text(fields.get("doc_id"), 512),
            collection=_column_text(fields.get("collection"), 64),
            event_id=_column_text(fields.get("event_id"), MAX_EVENT_ID_CHARS),
            event_json=escape_unstorable(_as_json(raw), REJECTED_EVENT_MAX_CHARS),
        )
    )


def reject_message(session: Session, raw: str, reason: str) -> None:
    """Keep a broker message that is no task call at all (field `message`), escaped and capped."""
    session.add(
        RejectedEvent(
            field="message",
            reason=escape_unstorable(reason, MAX_REASON_CHARS),
            event_json=escape_unstorable(raw, REJECTED_EVENT_MAX_CHARS),
        )
    )


def _column_text(value: Any, max_chars: int) -> str | None:
    return escape_unstorable(value, max_chars) if isinstance(value, str) else None


def _as_json(raw: Any) -> str:
    try:
        return json.dumps(raw, ensure_ascii=False, default=repr)
    except (ValueError, TypeError, RecursionError):
        return f"<{type(raw).__name__} that is not JSON>"


_one_less = sa.case((Document.attempts > 0, Document.attempts - 1), else_=0)


@dataclass(frozen=True)
class Claimed:
    """A document leased to one worker for one version."""

    id: int
    tenant: str
    collection: str
    doc_id: str
    version: int
    op: str
    text: str | None
    text_hash: str | None
    meta: dict[str, Any] | None
    attempts: int
    updated_at: dt.datetime


BATCH_OWNER_PREFIX = "batch:"  # the lease owner of a document a batch job serves (worker/batch/)


def claim(session: Session, *, owner: str, limit: int, lease_s: float) -> list[Claimed]:
    """Lease up to `limit` pending real-time-lane documents, oldest first (SKIP LOCKED on
    PostgreSQL). A newer real-time version of a document still leased by a batch job is taken:
    the job's older result then loses by the version rule."""
    now = utcnow()
    ready = (
        sa.select(Document.id)
        .where(Document.status == "pending")
        .where(sa.or_(Document.lane != "batch", Document.op == "delete"))  # deletes cost nothing
        .where(
            sa.or_(
                Document.lease_until.is_(None),
                Document.lease_until < now,
                Document.lease_owner.startswith(BATCH_OWNER_PREFIX),
            )
        )
        .order_by(Document.updated_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return _lease(session, ready, owner=owner, lease_s=lease_s, now=now)


def claim_batch(session: Session, *, owner: str, limit: int, lease_s: float) -> list[Claimed]:
    """Lease up to `limit` pending batch-lane documents, oldest first, to a batch job (`owner`
    starts with BATCH_OWNER_PREFIX; the lease spans the job's completion window)."""
    now = utcnow()
    ready = (
        sa.select(Document.id)
        .where(Document.status == "pending", Document.lane == "batch", Document.op == "upsert")
        .where(sa.or_(Document.lease_until.is_(None), Document.lease_until < now))
        .order_by(Document.updated_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return _lease(session, ready, owner=owner, lease_s=lease_s, now=now)


# The documents table for plain Core statements on the hot path (leases, settling): the ORM's
# bulk-update machinery costs more CPU than the SQL itself.
DOCS = cast(sa.Table, Document.__table__)
D = DOCS.c
_CLAIMED = [D[name] for name in Claimed.__dataclass_fields__]


def _lease(
    session: Session, ready: sa.ScalarSelect[int], *, owner: str, lease_s: float, now: dt.datetime
) -> list[Claimed]:
    rows = session.execute(
        sa.update(DOCS)
        .where(D.id.in_(ready))
        .values(lease_owner=owner, lease_until=now + dt.timedelta(seconds=lease_s), attempts=D.attempts + 1)
        .returning(*_CLAIMED)
    ).all()
    return sorted((Claimed(**row._mapping) for row in rows), key=lambda c: c.updated_at)


def _mine(doc: Claimed, owner: str) -> sa.ColumnElement[bool]:
    return sa.and_(Document.id == doc.id, Document.version == doc.version, Document.lease_owner == owner)


def _handed_back(session: Session, doc: Claimed, owner: str) -> None:
    """The document moved on to a newer version while leased: give it back for another round."""
    session.execute(
        sa.update(Document)
        .where(Document.id == doc.id, Document.lease_owner == owner)
        .values(lease_owner=None, lease_until=None, attempts=0)
        .execution_options(synchronize_session=False)
    )


def mark_indexed(session: Session, doc: Claimed, *, owner: str, chunk_count: int) -> bool:
    """Finish an upsert; False when a newer version arrived meanwhile (it stays pending)."""
    return _finish(
        session,
        doc,
        owner,
        status="indexed",
        indexed_hash=doc.text_hash,
        chunk_count=chunk_count,
    )


def mark_deleted(session: Session, doc: Claimed, *, owner: str) -> bool:
    return _finish(session, doc, owner, status="deleted", indexed_hash=None, chunk_count=0, text=None)


def _finish(session: Session, doc: Claimed, owner: str, **values: Any) -> bool:
    """Settle a claimed document at its claimed version, if it is still ours and still that
    version; else hand it back (a newer version is pending)."""
    done = changed_rows(
        session,
        sa.update(Document)
        .where(_mine(doc, owner))
        .values(
            indexed_version=doc.version,
            attempts=0,
            lease_owner=None,
            lease_until=None,
            last_error=None,
            **values,
        )
        .execution_options(synchronize_session=False),
    )
    if not done:
        _handed_back(session, doc, owner)
    return bool(done)


def release(session: Session, doc: Claimed, *, owner: str) -> None:
    """Hand a document back untouched (its rows wait for a fuller batch); not an attempt."""
    session.execute(
        sa.update(Document)
        .where(Document.id == doc.id, Document.lease_owner == owner)
        .values(
            lease_owner=None,
            lease_until=None,
            attempts=_one_less,
        )
        .execution_options(synchronize_session=False)
    )


def fail(
    session: Session,
    doc: Claimed,
    *,
    owner: str,
    error: str,
    retry_after_s: float,
    max_attempts: int | None,
) -> str:
    """Record a failed attempt: back to pending after `retry_after_s`, or dead after max_attempts.

    `max_attempts=None` is a failure that says nothing about the document (throttling, an
    outage): it does not count as an attempt and never makes a dead letter.
    """
    dead = max_attempts is not None and doc.attempts >= max_attempts
    values: dict[str, Any] = {
        "status": "dead" if dead else "pending",
        "last_error": error[:2000],
        "lease_owner": None,
        "lease_until": None if dead else utcnow() + dt.timedelta(seconds=retry_after_s),
    }
    if max_attempts is None:
        values["attempts"] = _one_less
    done = changed_rows(
        session,
        sa.update(Document)
        .where(_mine(doc, owner))
        .values(**values)
        .execution_options(synchronize_session=False),
    )
    if not done:  # a newer version arrived: it gets its own tries, not this version's verdict
        _handed_back(session, doc, owner)
        return "pending"
    return "dead" if dead else "pending"


def give_up(session: Session, doc: Claimed, *, owner: str, error: str) -> None:
    """This version of the document failed for good: a dead letter with the reason."""
    done = changed_rows(
        session,
        sa.update(Document)
        .where(_mine(doc, owner))
        .values(status="dead", last_error=error[:2000], lease_owner=None, lease_until=None)
        .execution_options(synchronize_session=False),
    )
    if not done:
        _handed_back(session, doc, owner)


def renew(session: Session, docs: list[Claimed], *, owner: str, lease_s: float) -> None:
    """Extend the leases of documents still being worked on (a long cycle must not lose them)."""
    if docs:
        session.execute(
            sa.update(Document)
            .where(Document.id.in_([d.id for d in docs]), Document.lease_owner == owner)
            .values(lease_until=utcnow() + dt.timedelta(seconds=lease_s))
            .execution_options(synchronize_session=False)
        )


def document_counts(session: Session) -> dict[str, int]:
    counts = {"pending": 0, "indexed": 0, "deleted": 0, "rejected": 0, "dead": 0}
    for status, n in session.execute(sa.select(Document.status, sa.func.count()).group_by(Document.status)):
        counts[status] = n
    counts["rejected"] = session.execute(sa.select(sa.func.count()).select_from(RejectedEvent)).scalar_one()
    return counts


def oldest_pending_age_s(session: Session) -> float | None:
    oldest: dt.datetime | None = session.execute(
        sa.select(sa.func.min(Document.updated_at)).where(Document.status == "pending")
    ).scalar_one()
    if oldest is None:
        return None
    return max(0.0, (utcnow() - oldest).total_seconds())
