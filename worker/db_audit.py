"""Tables of the spend audit: budget caps set through the API, and counters read by metrics and spend.

Kept apart from worker/db.py; they share its `Base` (and so its metadata and naming convention).
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from worker.db import Base, utcnow

OVERALL = "*"  # the `collection` of an overall cap ('*' never matches a collection name)


class BudgetCap(Base):
    """A spend cap changed through the API; it overrides the settings' cap of the same scope.

    `limit_nano_cny` NULL means "no cap" (an explicit override of a cap from the settings).
    """

    __tablename__ = "budget_caps"

    collection: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    period: Mapped[str] = mapped_column(sa.String(8), primary_key=True)  # day | month
    limit_nano_cny: Mapped[int | None] = mapped_column(sa.BigInteger)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Counter(Base):
    """Hourly counters: events by outcome, tokens avoided by dedup and coalescing.

    `bucket` is the UTC hour as text ("2026-11-21T07"), so grouping by hour or day is a prefix
    on both dialects. Empty strings stand for "not applicable" in the label columns.
    """

    __tablename__ = "counters"

    bucket: Mapped[str] = mapped_column(sa.String(13), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(64), primary_key=True, default="")
    collection: Mapped[str] = mapped_column(sa.String(64), primary_key=True, default="")
    tenant: Mapped[str] = mapped_column(sa.String(64), primary_key=True, default="")
    value: Mapped[int] = mapped_column(sa.BigInteger, default=0)
