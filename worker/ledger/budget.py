"""Spend caps per UTC day and month, overall and per collection, checked before each paid request.

    admit(session, collections=…, est_cost_nano=…)   raises BudgetExceeded when a cap would be passed
    budget_state(session)                              caps, spend in their windows, paused or not

Spent in a window = the cost of succeeded requests + the estimated cost (est_tokens at the model's
price) of requests `sent` or of `unknown` outcome, all by `created_at`. A request's cost counts
towards a collection in proportion to the est_tokens of its items in that collection (integer
nano-CNY, rounded down). A request is admitted only if spent + its estimated cost stays within
every applicable cap, so a cap is overshot at most by the difference between estimate and bill
(and, with several workers admitting at once, by one request each; pass `lock=True` inside the
transaction that writes the ledger intent row to serialize admissions on PostgreSQL).

Caps come from the settings (SIDECAR_BUDGET_*) and are overridden per scope by rows of
`budget_caps` written through the API (`set_cap`, `clear_cap`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.catalog import ModelSpec, cny_str, to_nano
from worker.errors import RetryLater
from worker.ledger.spent import spent_by_collection, spent_overall
from worker.settings import Settings
from worker.sql.engines import changed_rows
from worker.sql.models import (
    OVERALL,
    BudgetCap,
    Document,
    utcnow,
)

Period = Literal["day", "month"]
PERIODS: tuple[Period, ...] = ("day", "month")
RECHECK_S = 60.0  # a paused document is looked at again this often (raising a cap frees it at once)
_LOCK_KEY = 0x5EB0D6E7  # pg_advisory_xact_lock key of budget admissions
_PAUSED_ERROR = "BudgetExceeded:%"
MAX_CNY = 10**9  # caps are stored as BIGINT nano-CNY


@dataclass(frozen=True)
class Cap:
    collection: str | None  # None: all collections
    period: Period
    limit_nano: int
    source: Literal["settings", "api"]

    def describe(self) -> str:
        what = "all collections" if self.collection is None else f"collection {self.collection!r}"
        return (
            f"{'daily' if self.period == 'day' else 'monthly'} cap of CNY {money(self.limit_nano)} for {what}"
        )


class BudgetExceeded(RetryLater):
    """A spend cap would be passed by the next request: embedding waits (nothing is dropped)."""

    def __init__(self, message: str, *, retry_after_s: float, cap: Cap, resumes_at: dt.datetime) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.cap = cap
        self.resumes_at = resumes_at


def money(nano: int) -> str:
    """CNY for people: at least two decimals, no trailing zeros past them ("1.00", "0.0002")."""
    digits = cny_str(nano).rstrip("0")
    whole, _, fraction = digits.partition(".")
    return f"{whole}.{fraction.ljust(2, '0')}"


def parse_cny(value: Decimal | str | int) -> int:
    """A CNY amount as nano-CNY; ValueError for anything else, negative or finer than 1e-9."""
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a decimal amount of CNY") from None
    if not amount.is_finite() or not 0 <= amount < MAX_CNY:
        raise ValueError(f"{value!r} must be an amount of CNY from 0 to under {MAX_CNY}")
    return to_nano(amount)


def window(period: Period, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of the UTC day or month holding `now`."""
    now = now.astimezone(dt.UTC)
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + dt.timedelta(days=1)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


# --- caps -------------------------------------------------------------------------------------


def effective_caps(session: Session, settings: Settings) -> list[Cap]:
    """Caps from the settings, each scope overridden by a row of `budget_caps` (NULL: no cap)."""
    caps: dict[tuple[str | None, Period], Cap] = {}
    overall: dict[Period, Decimal | None] = {
        "day": settings.budget_daily_cny,
        "month": settings.budget_monthly_cny,
    }
    per_collection: dict[Period, dict[str, Decimal]] = {
        "day": settings.budget_collection_daily_cny,
        "month": settings.budget_collection_monthly_cny,
    }
    for period in PERIODS:
        amount = overall[period]
        if amount is not None:
            caps[(None, period)] = Cap(None, period, parse_cny(amount), "settings")
        for collection, amount_of_one in per_collection[period].items():
            caps[(collection, period)] = Cap(collection, period, parse_cny(amount_of_one), "settings")
    for row in session.execute(sa.select(BudgetCap)).scalars():
        period = _period(row.period)
        key = (None if row.collection == OVERALL else row.collection, period)
        if row.limit_nano_cny is None:
            caps.pop(key, None)
        else:
            caps[key] = Cap(key[0], period, row.limit_nano_cny, "api")
    return sorted(caps.values(), key=lambda c: (c.collection is not None, c.collection or "", c.period))


def _period(value: str) -> Period:
    for period in PERIODS:
        if value == period:
            return period
    raise ValueError(f"budget_caps.period must be day or month, not {value!r}")


def set_cap(session: Session, *, collection: str | None, period: Period, limit_nano: int | None) -> None:
    """Store a cap (None: no cap at all for this scope, whatever the settings say)."""
    key = {"collection": collection or OVERALL, "period": period}
    row = session.get(BudgetCap, key)
    if row is None:
        session.add(BudgetCap(**key, limit_nano_cny=limit_nano, updated_at=utcnow()))
    else:
        row.limit_nano_cny, row.updated_at = limit_nano, utcnow()
    session.flush()
    resume_paused(session)


def clear_cap(session: Session, *, collection: str | None, period: Period) -> bool:
    """Forget the API's cap for this scope: the settings' cap (if any) applies again."""
    gone = changed_rows(
        session,
        sa.delete(BudgetCap).where(
            BudgetCap.collection == (collection or OVERALL), BudgetCap.period == period
        ),
    )
    resume_paused(session)
    return bool(gone)


def resume_paused(session: Session) -> int:
    """Make documents that wait on the budget claimable now (after a cap changed)."""
    return changed_rows(
        session,
        sa.update(Document)
        .where(
            Document.status == "pending",
            Document.lease_owner.is_(None),
            Document.last_error.like(_PAUSED_ERROR),
        )
        .values(lease_until=None)
        .execution_options(synchronize_session=False),
    )


def _spent(session: Session, caps: list[Cap], now: dt.datetime) -> dict[Cap, int]:
    result: dict[Cap, int] = {}
    for period in PERIODS:
        mine = [c for c in caps if c.period == period]
        if not mine:
            continue
        start, end = window(period, now)
        overall = spent_overall(session, start, end) if any(c.collection is None for c in mine) else 0
        by_collection = spent_by_collection(
            session, start, end, {c.collection for c in mine if c.collection is not None}
        )
        for cap in mine:
            result[cap] = overall if cap.collection is None else by_collection[cap.collection]
    return result


# --- the two entry points ---------------------------------------------------------------------


def admit(
    session: Session,
    *,
    collections: set[str],
    est_cost_nano: int,
    now: dt.datetime | None = None,
    settings: Settings,
    lock: bool = False,
) -> None:
    """Raise BudgetExceeded if a request of `est_cost_nano` for `collections` would pass a cap.

    The request's whole estimate is checked against each of its collections' caps.
    """
    now = now or utcnow()
    caps = [
        c for c in effective_caps(session, settings) if c.collection is None or c.collection in collections
    ]
    if not caps:
        return
    if lock and session.get_bind().dialect.name == "postgresql":
        session.execute(sa.select(sa.func.pg_advisory_xact_lock(_LOCK_KEY)))
    spent = _spent(session, caps, now)
    over = [cap for cap in caps if spent[cap] + est_cost_nano > cap.limit_nano]
    if not over:
        return
    resumes_at = max(window(cap.period, now)[1] for cap in over)
    cap = next(c for c in over if window(c.period, now)[1] == resumes_at)
    message = (
        f"{cap.describe()} reached: spent {money(spent[cap])}, this request ~{money(est_cost_nano)}; "
        f"resumes at {resumes_at:%Y-%m-%dT%H:%MZ} or when the cap is raised"
    )
    raise BudgetExceeded(
        message,
        retry_after_s=min(RECHECK_S, (resumes_at - now).total_seconds()),
        cap=cap,
        resumes_at=resumes_at,
    )


def budget_state(session: Session, settings: Settings, now: dt.datetime | None = None) -> dict[str, Any]:
    """{"paused", "paused_collections", "reasons", "caps", "waiting_documents"} for status, readyz, metrics.

    A cap is reached when the spend in its window is at or above it; `paused` means an overall cap is
    reached (nothing is embedded); a reached collection cap pauses only that collection.
    """
    now = now or utcnow()
    caps = effective_caps(session, settings)
    spent = _spent(session, caps, now)
    rows, reasons, paused_collections, paused = [], [], [], False
    for cap in caps:
        start, end = window(cap.period, now)
        reached = spent[cap] >= cap.limit_nano
        if reached:
            reasons.append(
                f"{cap.describe()} reached: spent {money(spent[cap])}; "
                f"resumes at {end:%Y-%m-%dT%H:%MZ} or when the cap is raised"
            )
            if cap.collection is None:
                paused = True
            else:
                paused_collections.append(cap.collection)
        rows.append(
            {
                "collection": cap.collection,
                "period": cap.period,
                "source": cap.source,
                "limit_cny": cny_str(cap.limit_nano),
                "spent_cny": cny_str(spent[cap]),
                "remaining_cny": cny_str(max(0, cap.limit_nano - spent[cap])),
                "limit_nano_cny": cap.limit_nano,
                "spent_nano_cny": spent[cap],
                "window_start": start.isoformat(),
                "resets_at": end.isoformat(),
                "reached": reached,
            }
        )
    waiting = session.execute(
        sa.select(sa.func.count())
        .select_from(Document)
        .where(Document.status == "pending", Document.last_error.like(_PAUSED_ERROR))
    ).scalar_one()
    return {
        "paused": paused,
        "paused_collections": sorted(set(paused_collections)),
        "reasons": reasons,
        "caps": rows,
        "waiting_documents": int(waiting),
    }


BudgetCheck = Callable[[Session, set[str], int], None]


def pipeline_check(spec: ModelSpec, settings: Settings) -> BudgetCheck:
    """The pipeline's budget hook: `check(session, collections, est_tokens)` admits one request
    of `est_tokens` for `collections` or raises BudgetExceeded.

    Called inside the transaction that writes the request's ledger intent row (under a lock), so
    concurrent workers cannot overshoot a cap together.
    """

    def check(session: Session, collections: set[str], est_tokens: int) -> None:
        admit(
            session,
            collections=collections,
            est_cost_nano=spec.cost_nano_cny(est_tokens),
            settings=settings,
            lock=True,
        )

    return check
