"""Recording a message's events: each validated, then committed as its document's desired state
(worker/sql/documents.py) or kept as a rejection, every event of the message in one transaction.

One event that fails inside that transaction (a value the database refuses, a bug) rolls it back;
the message is then recorded event by event, each in its own transaction, so that event alone is
rejected with its reason and the others are accepted. SQL or the broker being unreachable
(TRANSIENT) propagates: the Celery task (worker/tasks.py) retries the whole message.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import redis
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import exc as sql_errors
from sqlalchemy.orm import Session

from worker.errors import InvalidEvent, RetryLater
from worker.events import FIELDS, Event, parse_with
from worker.ledger import counters
from worker.runtime import Runtime
from worker.sql import attempts, documents

log = logging.getLogger(__name__)

TRANSIENT = (
    sql_errors.OperationalError,
    sql_errors.InterfaceError,
    sql_errors.DisconnectionError,
    sql_errors.TimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    BrokerError,
    ConnectionError,
    TimeoutError,
    RetryLater,
)


def ingest_events(
    rt: Runtime, raw_events: list[Any], *, message_id: str | None = None, attempt_key: str | None = None
) -> dict[str, int]:
    """Validate and record every event of a message in one transaction; returns counts by outcome.

    `message_id` (the broker message's id) makes a redelivered message's version-less events
    duplicates instead of new versions; `attempt_key` is marked finished in the same transaction.
    Should one event fail there (a value the database refuses, a bug), that transaction is rolled
    back and each event is recorded in its own, so the failing one is rejected alone with its
    reason. A transient failure (TRANSIENT) propagates, so the message is retried."""
    parsed = [_parse(rt, raw) for raw in raw_events]
    try:
        outcomes = _ingest_together(rt, raw_events, parsed, message_id, attempt_key)
    except TRANSIENT as exc:
        if not is_deadlock(exc):
            raise
        # Another message locked some of these documents in another order: one transaction each.
        log.info("ingest.one_by_one events=%d error=deadlock", len(raw_events))
        outcomes = _ingest_one_by_one(rt, raw_events, parsed, message_id, attempt_key)
    except Exception as exc:  # one event spoils the message's transaction: one transaction each
        log.info("ingest.one_by_one events=%d error=%s", len(raw_events), type(exc).__name__)
        outcomes = _ingest_one_by_one(rt, raw_events, parsed, message_id, attempt_key)
    for item in parsed:
        if not isinstance(item, Event):
            _log_rejected(item[0], item[1])
    if outcomes["accepted"]:
        rt.wake.set()
    return dict(outcomes)


Parsed = Event | tuple[str, str]  # an event, or why it is none: (field, rule)
DEADLOCK = "40P01"  # PostgreSQL's SQLSTATE deadlock_detected


def is_deadlock(exc: BaseException) -> bool:
    """PostgreSQL chose this transaction to break a deadlock (SQLite's writers never deadlock)."""
    orig = getattr(exc, "orig", None)
    return DEADLOCK in (getattr(orig, "sqlstate", None), getattr(orig, "pgcode", None))


def _parse(rt: Runtime, raw: Any) -> Parsed:
    try:
        return parse_with(raw, rt.settings)
    except InvalidEvent as exc:
        return exc.field, exc.rule
    except Exception as exc:  # a bug in validation: this event only
        return "event", type(exc).__name__


def _delivery_id(message_id: str | None, index: int) -> str | None:
    return f"{message_id}:{index}" if message_id else None


def _ingest_together(
    rt: Runtime, raw_events: list[Any], parsed: list[Parsed], message_id: str | None, attempt_key: str | None
) -> Counter[str]:
    """Every event, its counters and the attempt's end in one transaction; raises on any failure."""
    outcomes: Counter[str] = Counter()
    coalesced: Counter[tuple[str, str]] = Counter()
    with rt.sessions.begin() as session:
        for index, (raw, item) in enumerate(zip(raw_events, parsed, strict=True)):
            if isinstance(item, Event):
                delivery_id = _delivery_id(message_id, index)
                outcomes[documents.accept(session, item, coalesced, delivery_id=delivery_id)] += 1
            else:
                documents.reject(session, raw, *item)
                outcomes["rejected"] += 1
        _close_message(rt, session, outcomes, coalesced, attempt_key)
    return outcomes


def _ingest_one_by_one(
    rt: Runtime, raw_events: list[Any], parsed: list[Parsed], message_id: str | None, attempt_key: str | None
) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    coalesced: Counter[tuple[str, str]] = Counter()
    for index, (raw, item) in enumerate(zip(raw_events, parsed, strict=True)):
        delivery_id = _delivery_id(message_id, index)
        outcomes[_ingest_one(rt, raw, item, coalesced, delivery_id)] += 1
    with rt.sessions.begin() as session:
        _close_message(rt, session, outcomes, coalesced, attempt_key)
    return outcomes


def _close_message(
    rt: Runtime,
    session: Session,
    outcomes: Counter[str],
    coalesced: Counter[tuple[str, str]],
    attempt_key: str | None,
) -> None:
    counters.record_outcomes(session, outcomes)
    counters.record_avoided(session, "coalesced", coalesced, model=rt.embedder.model)
    if attempt_key is not None:
        attempts.message_finished(session, attempt_key)


def _ingest_one(
    rt: Runtime, raw: Any, item: Parsed, coalesced: Counter[tuple[str, str]], delivery_id: str | None
) -> str:
    """One event in its own transaction: its outcome, or "rejected" with the reason recorded."""
    if isinstance(item, Event):
        try:
            saved: Counter[tuple[str, str]] = Counter()
            with rt.sessions.begin() as session:
                outcome = documents.accept(session, item, saved, delivery_id=delivery_id)
            coalesced.update(saved)
            return outcome
        except InvalidEvent as exc:
            field, rule = exc.field, exc.rule
        except TRANSIENT:
            raise
        except Exception as exc:  # a bug, or a value the database refused: this event only
            field, rule = "event", type(exc).__name__
        _log_rejected(field, rule)
    else:
        field, rule = item
    with rt.sessions.begin() as session:
        documents.reject(session, raw, field, rule)
    return "rejected"


def _log_rejected(field: str, rule: str) -> None:
    shown = field if field in FIELDS or field == "event" else "<unknown field>"
    log.warning("event.rejected field=%s rule=%s", shown, rule)
