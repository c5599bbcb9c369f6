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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import exc as sql_errors
from sqlalchemy.orm import Session

from worker.errors import InvalidEvent, RetryLater
from worker.events import FIELDS, Event, parse_with
from worker.ledger import counters
from worker.runtime import Runtime
from worker.sql import accepting, attempts, documents

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
    message = _Message(raw_events, [_parse(rt, raw) for raw in raw_events], message_id, attempt_key)
    outcomes = rt.intake.submit(message, lambda group: _ingest_group(rt, group))
    if outcomes is None:  # the group's transaction failed: this message on its own
        outcomes = _ingest_message(rt, message)
    for item in message.parsed:
        if not isinstance(item, Event):
            _log_rejected(item[0], item[1])
    if outcomes["accepted"]:
        rt.wake.set()
    return dict(outcomes)


Parsed = Event | tuple[str, str]  # an event, or why it is none: (field, rule)


@dataclass(frozen=True)
class _Message:
    raw_events: list[Any]
    parsed: list[Parsed]
    message_id: str | None
    attempt_key: str | None


def _ingest_group(rt: Runtime, group: Sequence[_Message]) -> list[Counter[str] | None]:
    """Messages that arrived together (worker/groupcommit.py): one alone as below; several in
    one transaction, or, should it fail, None each (each then goes on its own)."""
    if len(group) == 1:
        return [_ingest_message(rt, group[0])]
    try:
        return list(_ingest_messages_together(rt, group))
    except Exception as exc:
        log.info("ingest.group_split messages=%d error=%s", len(group), type(exc).__name__)
        return [None] * len(group)


def _ingest_message(rt: Runtime, m: _Message) -> Counter[str]:
    """One message in one transaction; should an event fail there, one transaction per event."""
    try:
        return _ingest_messages_together(rt, [m])[0]
    except TRANSIENT as exc:
        if not is_deadlock(exc):
            raise
        # Another message locked some of these documents in another order: one transaction each.
        log.info("ingest.one_by_one events=%d error=deadlock", len(m.raw_events))
    except Exception as exc:  # one event spoils the message's transaction: one transaction each
        log.info("ingest.one_by_one events=%d error=%s", len(m.raw_events), type(exc).__name__)
    return _ingest_one_by_one(rt, m.raw_events, m.parsed, m.message_id, m.attempt_key)


def _ingest_messages_together(rt: Runtime, group: Sequence[_Message]) -> list[Counter[str]]:
    """Every event of every message, the counters and the attempts' ends in one transaction."""
    per_message: list[Counter[str]] = [Counter() for _ in group]
    coalesced: Counter[tuple[str, str]] = Counter()
    with rt.sessions.begin() as session:
        _record(session, list(enumerate(group)), coalesced, per_message)
        _close_messages(rt, session, sum(per_message, Counter()), coalesced, [m.attempt_key for m in group])
    return per_message


def _record(
    session: Session,
    messages: list[tuple[int, _Message]],
    coalesced: Counter[tuple[str, str]],
    outcomes: list[Counter[str]],
) -> None:
    """Rejections kept, then every event accepted in one go (accepting.accept_many: new
    documents in key order, so that two processes lock shared ones in the same order), each
    outcome counted in its message's Counter of `outcomes`."""
    events: list[tuple[Event, str | None]] = []
    owners: list[int] = []
    for n, m in messages:
        for index, (raw, item) in enumerate(zip(m.raw_events, m.parsed, strict=True)):
            if isinstance(item, Event):
                events.append((item, _delivery_id(m.message_id, index)))
                owners.append(n)
            else:
                documents.reject(session, raw, *item)
                outcomes[n]["rejected"] += 1
    for n, outcome in zip(owners, accepting.accept_many(session, events, coalesced), strict=True):
        outcomes[n][outcome] += 1


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


def _ingest_one_by_one(
    rt: Runtime, raw_events: list[Any], parsed: list[Parsed], message_id: str | None, attempt_key: str | None
) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    coalesced: Counter[tuple[str, str]] = Counter()
    for index, (raw, item) in enumerate(zip(raw_events, parsed, strict=True)):
        delivery_id = _delivery_id(message_id, index)
        outcomes[_ingest_one(rt, raw, item, coalesced, delivery_id)] += 1
    with rt.sessions.begin() as session:
        _close_messages(rt, session, outcomes, coalesced, [attempt_key])
    return outcomes


def _close_messages(
    rt: Runtime,
    session: Session,
    outcomes: Counter[str],
    coalesced: Counter[tuple[str, str]],
    attempt_keys: list[str | None],
) -> None:
    """The messages' counters, and the ends of their attempts (rows only redeliveries have)."""
    counters.record_outcomes(session, outcomes)
    counters.record_avoided(session, "coalesced", coalesced, model=rt.embedder.model)
    attempts.message_finished(session, *(key for key in attempt_keys if key is not None))


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
