"""Accepting events: each one recorded as its document's desired state, by the version rule.

`accept` takes one event; `accept_many` a message's (or a group of messages') in the same
transaction with the same outcomes, but in three statements when nothing conflicts: the
idempotency keys in one multi-row INSERT … ON CONFLICT DO NOTHING, the new documents in another,
and only the events that found their document there (or a key seen before) one by one through
the version rule. The caller commits (worker/intake.py).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker import chunking, tokens
from worker.errors import InvalidEvent
from worker.events import MAX_EVENT_ID_CHARS, MAX_VERSION, Event
from worker.sql.engines import insert_ignore, inserted_keys
from worker.sql.models import Document, SeenEvent, fitted_key, utcnow

Outcome = Literal["accepted", "stale", "duplicate"]
MAX_STORED_VERSION = MAX_VERSION + 1  # the largest version the vector store compares exactly
DocKey = tuple[str, str, str]  # (tenant, collection, doc_id), or (tenant, collection, event key)


def text_hash(text: str) -> str:
    return chunking.content_hash(text)


def accept(
    session: Session,
    event: Event,
    coalesced: Counter[tuple[str, str]] | None = None,
    *,
    delivery_id: str | None = None,
) -> Outcome:
    """Record an event as the document's desired state, unless an equal or newer version is there.

    Without a `version`, arrival order is the version (the stored one plus one); such an event
    is then recorded under `delivery_id` (its message and position) when it has no `event_id`,
    so that a redelivered message does not bump the version again. When a pending version is
    replaced before it was embedded, its tokens are added to `coalesced` by (collection,
    tenant): what coalescing saved. InvalidEvent when a version-less event finds the largest
    version there is (the caller rolls back and records the rejection).
    """
    now = utcnow()
    if _seen_before(session, event, delivery_id, now):
        return "duplicate"
    key = {"tenant": event.tenant, "collection": event.collection, "doc_id": event.doc_id}
    if insert_ignore(session, Document, {**key, **_new_document(event, now)}):
        return "accepted"
    return _update_existing(session, event, coalesced, now)


def _update_existing(
    session: Session, event: Event, coalesced: Counter[tuple[str, str]] | None, now: dt.datetime
) -> Outcome:
    """The version rule against the document's row (locked); see `accept`."""
    values = _desired_state(event, now)
    key = {"tenant": event.tenant, "collection": event.collection, "doc_id": event.doc_id}
    doc = session.execute(sa.select(Document).filter_by(**key).with_for_update()).scalar_one()
    version = _next_version(doc.version, event.version)
    if version is None:
        return "stale" if event.version is not None and event.version < doc.version else "duplicate"
    if (
        coalesced is not None
        and doc.status == "pending"
        and doc.lease_owner is None
        and doc.text
        and doc.text_hash != values["text_hash"]
    ):
        coalesced[(doc.collection, doc.tenant)] += tokens.count_tokens(doc.text)
    # A lease held on an older version stays: its holder sees the new version when it finishes
    # and hands the document back, so two workers never write one document at once.
    for name, value in {**values, "version": version}.items():
        setattr(doc, name, value)
    return "accepted"


def _idempotency_key(event: Event, delivery_id: str | None) -> str | None:
    """The event's `event_id`; for a version-less event without one, its delivery's."""
    if event.event_id is None and event.version is None and delivery_id:
        return fitted_key(f"delivery:{delivery_id}", MAX_EVENT_ID_CHARS)
    return event.event_id


def _seen_before(session: Session, event: Event, delivery_id: str | None, now: dt.datetime) -> bool:
    """Record the event's idempotency key (per tenant and collection); True if it was there."""
    key = _idempotency_key(event, delivery_id)
    if key is None:
        return False
    row = {"tenant": event.tenant, "collection": event.collection, "event_id": key, "received_at": now}
    return not insert_ignore(session, SeenEvent, row)


def _new_document(event: Event, now: dt.datetime) -> dict[str, Any]:
    return {**_desired_state(event, now), "version": event.version or 0, "created_at": now}


def _desired_state(event: Event, now: dt.datetime) -> dict[str, Any]:
    return {
        "op": event.op,
        "text": event.text,
        "text_hash": text_hash(event.text) if event.text is not None else None,
        "meta": event.metadata,
        "status": "pending",
        "attempts": 0,
        "last_error": None,
        "event_id": event.event_id,
        "updated_at": now,
        "lane": event.lane,
    }


def _next_version(stored: int, given: int | None) -> int | None:
    """The version the event makes, or None when it is not newer than the stored one."""
    if given is not None:
        return given if given > stored else None
    if stored >= MAX_STORED_VERSION:
        raise InvalidEvent(
            "version",
            f"required: the stored version is {MAX_STORED_VERSION}, the largest there is, "
            "so arrival order cannot number this event",
        )
    return stored + 1


def accept_many(
    session: Session,
    events: Sequence[tuple[Event, str | None]],
    coalesced: Counter[tuple[str, str]] | None = None,
) -> list[Outcome]:
    """`accept` for each (event, delivery_id) in order, with the same outcomes: keys seen before
    and documents already there go through `accept`'s rules one by one, everything new goes in
    with one statement per table. Raises what `accept` raises (the caller rolls back)."""
    now = utcnow()
    outcomes: list[Outcome | None] = [None] * len(events)
    keyed: dict[DocKey, int] = {}  # an idempotency key -> the first event carrying it
    for i, (event, delivery_id) in enumerate(events):
        id_key = _idempotency_key(event, delivery_id)
        if id_key is not None:
            if (event.tenant, event.collection, id_key) in keyed:
                outcomes[i] = "duplicate"  # its key went in with an earlier event of this lot
            else:
                keyed[(event.tenant, event.collection, id_key)] = i
    rows = [{"tenant": t, "collection": c, "event_id": k, "received_at": now} for t, c, k in sorted(keyed)]
    new_keys = inserted_keys(session, SeenEvent, rows, ("tenant", "collection", "event_id"))
    for seen, i in keyed.items():
        if seen not in new_keys:
            outcomes[i] = "duplicate"
    first: dict[DocKey, int] = {}  # a document -> the first event of this lot for it
    for i, (event, _) in enumerate(events):
        if outcomes[i] is None:
            first.setdefault((event.tenant, event.collection, event.doc_id), i)
    rows = [
        {"tenant": t, "collection": c, "doc_id": d, **_new_document(events[i][0], now)}
        for (t, c, d), i in sorted(first.items())
    ]
    for doc in inserted_keys(session, Document, rows, ("tenant", "collection", "doc_id")):
        outcomes[first[doc]] = "accepted"
    for i, (event, _) in enumerate(events):
        if outcomes[i] is None:  # its document was there: the version rule
            outcomes[i] = _update_existing(session, event, coalesced, now)
    return [outcome for outcome in outcomes if outcome is not None]
