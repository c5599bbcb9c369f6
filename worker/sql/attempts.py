"""Deliveries of broker messages that began and never finished, so a message that keeps stopping
the worker is dead-lettered after a bounded number of tries instead of looping."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.sql.engines import insert_ignore
from worker.sql.models import MessageAttempt, fitted_key, utcnow

MAX_KEY_CHARS = 64  # the column; a longer key (a producer's own task id) is stored as its sha256


def message_started(session: Session, key: str, *, first: int = 1) -> int:
    """Count one more delivery of a broker message; returns how many began without finishing.
    `first`: the count of a delivery with no row yet (2 for a redelivery whose first delivery
    was not recorded, see worker/tasks.py)."""
    key = fitted_key(key, MAX_KEY_CHARS)
    if insert_ignore(session, MessageAttempt, {"task_id": key, "attempts": first, "first_seen": utcnow()}):
        return first
    session.execute(
        sa.update(MessageAttempt)
        .where(MessageAttempt.task_id == key)
        .values(attempts=MessageAttempt.attempts + 1)
    )
    return session.execute(
        sa.select(MessageAttempt.attempts).where(MessageAttempt.task_id == key)
    ).scalar_one()


def message_finished(session: Session, *keys: str) -> None:
    """The deliveries of these messages finished: their rows go (one statement however many)."""
    fitted = [fitted_key(key, MAX_KEY_CHARS) for key in keys]
    if fitted:
        session.execute(sa.delete(MessageAttempt).where(MessageAttempt.task_id.in_(fitted)))
