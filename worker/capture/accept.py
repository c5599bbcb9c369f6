"""Changes of one source → events of §2 → the accept path of `sidecar.ingest` (worker/intake.py).

A `Change` is what either kind of source reads: an upsert or delete of one row (column → value)
at a version, or a truncate. `accept_changes` renders each into an event with the source's
templates, validates it with the same rules as every event (worker/events.py) so that a bad row
is rejected naming the source, its key and the rule (and the rest go on), keeps the last change
of each document (changes of one transaction share its version), and hands the events to
`ingest_events`, which commits them. The caller acknowledges the position only after this returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa

from worker.capture.sources import UNAVAILABLE, RowRejected, Source, render, render_delete, row_key
from worker.errors import InvalidEvent
from worker.events import parse_with
from worker.intake import ingest_events
from worker.ledger import counters
from worker.runtime import Runtime
from worker.sql import documents
from worker.sql.models import Document

log = logging.getLogger(__name__)
Pending = dict[tuple[str, str, str], dict[str, Any]]  # this batch's events by (collection, tenant, doc_id)
Rejection = tuple[dict[str, Any], str, str]  # (what rejected_events keeps, field, reason)
# Reads the row again by its key (PostgreSQL, for unchanged TOASTed columns); None when it is gone.
Reread = Callable[[dict[str, Any]], dict[str, Any] | None]


@dataclass(frozen=True)
class Change:
    op: Literal["upsert", "delete", "truncate"]
    version: int
    row: dict[str, Any]
    position: str  # where the source holds it (LSN, stream entry id): named in rejections
    lane: str | None = None


@dataclass
class Accepted:
    events: int = 0
    rejected: int = 0
    skipped: int = 0
    outcomes: dict[str, int] | None = None
    documents: set[tuple[str, str]] = field(default_factory=set)  # (tenant, doc_id) of the events


def accept_changes(
    rt: Runtime, source: Source, changes: list[Change], *, message_id: str, reread: Reread | None = None
) -> Accepted:
    """Commit `changes` (in order) as document states; rejections recorded with source and key."""
    result = Accepted()
    events: Pending = {}
    rejections: list[Rejection] = []
    for change in changes:
        if change.op == "truncate":
            for deletion in truncate_events(rt, source, change.version, pending=list(events.values())):
                _keep_last(events, deletion)
            continue
        try:
            event = _event(rt, source, change, reread, events)
        except (RowRejected, InvalidEvent) as exc:
            rejections.append(_rejection(source, change, exc.field, exc.rule))
            continue
        if event is None:
            result.skipped += 1
            continue
        _keep_last(events, event)
    record_rejections(rt, rejections)
    result.rejected = len(rejections)
    result.events = len(events)
    default_tenant = rt.settings.default_tenant
    result.documents = {(e.get("tenant", default_tenant), e["doc_id"]) for e in events.values()}
    if events:
        result.outcomes = ingest_events(rt, list(events.values()), message_id=message_id)
    return result


def _event(
    rt: Runtime, source: Source, change: Change, reread: Reread | None, pending: Pending
) -> dict[str, Any] | None:
    """The validated event of one change; None when there is nothing to apply."""
    row = change.row
    if change.op == "delete":
        event = render_delete(source, row, version=change.version)
    else:
        text = None
        if any(row.get(column) == UNAVAILABLE for column in source.columns):
            filled = _fill_unavailable(rt, source, row, reread, pending)
            if filled is None:
                return None  # the row is gone since: its delete follows in the stream
            row, text = filled[0], filled[1]
        event = render(source, row, version=change.version, lane=change.lane, text=text)
    parse_with(event, rt.settings)  # InvalidEvent: the rule, as for any event
    return event


def _fill_unavailable(
    rt: Runtime, source: Source, row: dict[str, Any], reread: Reread | None, pending: Pending
) -> tuple[dict[str, Any], str | None] | None:
    """A row whose unchanged TOASTed (or Debezium-unavailable) columns have values again, and the
    text to keep (or None: render it): read again by key where the database is at hand, else the
    stored document's text and metadata values (the columns did not change)."""
    if reread is not None:
        again = reread(row)
        return None if again is None else (again, None)
    missing = {c for c in source.columns if row.get(c) == UNAVAILABLE}
    if missing - source.text_columns - set(source.metadata):
        raise RowRejected("doc_id", f"key column {sorted(missing)[0]!r} is unavailable")
    stored = _stored(rt, source, row, pending)
    text = None
    if missing & source.text_columns:
        if stored is None:
            raise RowRejected("text", "a text column is unavailable and there is no stored text to keep")
        text = stored[0]
    meta = stored[1] if stored is not None else {}
    filled = {c: meta.get(c) if c in missing and c in source.metadata else v for c, v in row.items()}
    return {**filled, **{c: "" for c in missing & source.text_columns}}, text


def _stored(
    rt: Runtime, source: Source, row: dict[str, Any], pending: Pending
) -> tuple[str, dict[str, Any]] | None:
    """(text, metadata) of the document as it stands: in this batch, else in SQL; None if none."""
    event = render_delete(source, {k: v for k, v in row.items() if v != UNAVAILABLE}, version=0)
    held = pending.get(_key(event))
    if held is not None:
        return (held["text"], held.get("metadata") or {}) if held["op"] == "upsert" else None
    key = {
        "collection": source.collection,
        "tenant": event.get("tenant", rt.settings.default_tenant),
        "doc_id": event["doc_id"],
    }
    with rt.sessions() as session:
        doc = session.execute(sa.select(Document).filter_by(**key)).scalar_one_or_none()
        if doc is None or doc.op != "upsert" or doc.text is None:
            return None
        return doc.text, dict(doc.meta or {})


def truncate_events(
    rt: Runtime,
    source: Source,
    version: int,
    *,
    pending: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> list[dict[str, Any]]:
    """A delete at `version` for every live document of the source's collection (committed, or
    among the `pending` events of the same batch)."""
    with rt.sessions() as session:
        docs = session.execute(
            sa.select(Document.tenant, Document.doc_id).where(
                Document.collection == source.collection, Document.op == "upsert", Document.version < version
            )
        ).all()
    keys = {(t, d) for t, d in docs}
    default = rt.settings.default_tenant
    keys |= {
        (e.get("tenant", default), e["doc_id"])
        for e in pending
        if e["op"] == "upsert" and e["version"] < version
    }
    return [
        {"op": "delete", "collection": source.collection, "tenant": t, "doc_id": d, "version": version}
        for t, d in sorted(keys)
    ]


def _key(event: dict[str, Any]) -> tuple[str, str, str]:
    return event["collection"], event.get("tenant", ""), event["doc_id"]


def _keep_last(events: Pending, event: dict[str, Any]) -> None:
    """Keep one event per document: the higher version, or the later of equal ones (one transaction)."""
    key = _key(event)
    held = events.get(key)
    if held is not None and held["version"] > event["version"]:
        return
    events.pop(key, None)
    events[key] = event


def _rejection(source: Source, change: Change, field: str, rule: str) -> Rejection:
    return rejection(source, row_key(source, change.row), change.position, field, rule)


def rejection(source: Source, key: str, position: str, field: str, rule: str) -> Rejection:
    """A rejected change as `rejected_events` keeps it: the reason names source, key and position."""
    raw = {"source": source.name, "key": key, "position": position, "collection": source.collection}
    return raw, field, f"source {source.name} key {key} at {position}: {rule}"


def record_rejections(rt: Runtime, rejections: list[Rejection]) -> None:
    if not rejections:
        return
    with rt.sessions.begin() as session:
        for raw, field, reason in rejections:
            documents.reject(session, raw, field, reason)
        counters.record_outcomes(session, {"rejected": len(rejections)})
    for raw, field, _ in rejections:
        log.warning("capture.rejected source=%s field=%s position=%s", raw["source"], field, raw["position"])
