"""Counters kept in SQL, so every process adds to the same numbers and metrics read them at scrape time.

    record_outcomes   events by outcome (accepted, stale, duplicate; rejected events are rows)
    record_avoided    tokens never sent: dedup (cache hits, shared rows) and coalescing
                      (a pending version replaced before it was embedded)

Each call is one upsert-increment per label set, inside the caller's transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Literal

from sqlalchemy.orm import Session

from worker.sql.engines import insert_or_add
from worker.sql.models import HourlyCounter, utcnow

AvoidedKind = Literal["dedup", "coalesced"]
EVENT_PREFIX = "events_"
AVOIDED_PREFIX = "tokens_avoided_"


def hour_bucket(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H")


def record_outcomes(session: Session, outcomes: Mapping[str, int], *, now: dt.datetime | None = None) -> None:
    """Add ingest outcomes ({"accepted": 3, "stale": 1, ...}); zero counts are skipped."""
    bucket = hour_bucket(now or utcnow())
    rows = [
        {
            "bucket": bucket,
            "name": f"{EVENT_PREFIX}{outcome}"[:32],
            "model": "",
            "collection": "",
            "tenant": "",
            "value": int(n),
        }
        for outcome, n in sorted(outcomes.items())
        if n
    ]
    insert_or_add(session, HourlyCounter, rows, column="value")


def record_avoided(
    session: Session,
    kind: AvoidedKind,
    tokens_by: Mapping[tuple[str, str], int],
    *,
    model: str,
    now: dt.datetime | None = None,
) -> None:
    """Add tokens that were not sent, by (collection, tenant)."""
    if kind not in ("dedup", "coalesced"):
        raise ValueError(f"kind must be dedup or coalesced, got {kind!r}")
    bucket = hour_bucket(now or utcnow())
    rows = [
        {
            "bucket": bucket,
            "name": f"{AVOIDED_PREFIX}{kind}",
            "model": model,
            "collection": collection,
            "tenant": tenant,
            "value": int(n),
        }
        for (collection, tenant), n in sorted(tokens_by.items())
        if n
    ]
    insert_or_add(session, HourlyCounter, rows, column="value")
