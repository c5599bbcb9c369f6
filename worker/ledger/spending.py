"""Spend over time: requests, rows, billed tokens and CNY grouped by hour, day, model, lane,
collection or tenant, with the tokens that dedup and coalescing saved beside them (the CLI and the
API print it). Lanes: `realtime` and `batch` embed documents, `query` embeds searches.

A range of whole UTC hours (what the console asks for) reads the hourly roll-ups
(worker/ledger/rollups.py) by hour, day, model and lane, and the kept per-hour splits by collection
and tenant (worker/ledger/shares.py): O(hours), not O(ledger rows). Any other range sums the
ledger rows (by collection and tenant: split in SQL, the same rule)."""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import InstrumentedAttribute, Session

from worker.catalog import cny_str
from worker.ledger import rollups, shares
from worker.ledger.counters import AVOIDED_PREFIX, hour_bucket
from worker.sql.models import HourlyCounter, ProviderRequest

log = logging.getLogger(__name__)
GROUPINGS = ("hour", "day", "model", "lane", "collection", "tenant")
_SUMS = (
    "requests",
    "failed",
    "rows",
    "tokens",
    "cost_nano_cny",
    "tokens_avoided_dedup",
    "tokens_avoided_coalesced",
)
Groups = dict[tuple[Any, ...], dict[str, int]]
KeyColumn = sa.ColumnElement[Any] | InstrumentedAttribute[Any]


def in_range(col: Any, since: dt.datetime | None, until: dt.datetime | None) -> list[sa.ColumnElement[bool]]:
    """`since` ≤ col < `until`, each bound when given."""
    where: list[sa.ColumnElement[bool]] = []
    if since is not None:
        where.append(col >= since)
    if until is not None:
        where.append(col < until)
    return where


def allocate(total: int, parts: dict[Any, int]) -> dict[Any, int]:
    """Split an integer in proportion to `parts` (largest remainder; ties by key): sums to `total`.
    The rule `spend` applies in SQL by collection and tenant (worker/ledger/shares.py); kept here
    as its reference (tests/test_spend_allocation.py checks the two agree)."""
    weight = sum(parts.values())
    if weight <= 0:
        keys = sorted(parts, key=repr)
        return {k: (total if i == 0 else 0) for i, k in enumerate(keys)}
    shares = {k: total * w // weight for k, w in parts.items()}
    left = total - sum(shares.values())
    order = sorted(parts, key=lambda k: (-(total * parts[k] % weight), repr(k)))
    for k in order[:left]:
        shares[k] += 1
    return shares


def _empty() -> dict[str, int]:
    return {k: 0 for k in _SUMS}


def spend(
    session: Session,
    *,
    by: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> dict[str, Any]:
    """Requests, rows, billed tokens and CNY, grouped, with the tokens avoided beside them.

    `by` None groups by UTC day and model (the original report); otherwise one of GROUPINGS.
    Collection and tenant shares of a request follow the est_tokens of its items (largest
    remainder, so the groups sum to the total); a query row has no items and counts whole
    towards the collection and tenant it names. Range: `since` ≤ created_at < `until`; tokens
    avoided are counted by the hour, so a range starting mid-hour includes that whole hour.
    Counters of tokens avoided carry no lane: by lane they appear in the total only.
    """
    if by is not None and by not in GROUPINGS:
        raise ValueError(f"by must be one of {', '.join(GROUPINGS)}, got {by!r}")
    groups: Groups = defaultdict(_empty)
    distinct = None
    if rollups.whole_hours(since, until):  # read from the roll-ups: fold what is pending first
        _fold(session)
    if by in ("collection", "tenant"):
        distinct = _spend_by_document(session, by, since, until, groups)
    elif rollups.whole_hours(since, until):
        _spend_by_hour(session, by, since, until, groups)
    else:
        _spend_by_request(session, by, since, until, groups)
    unsplit: Groups = defaultdict(_empty)
    _avoided(session, by, since, until, unsplit if by == "lane" else groups)

    names = ("day", "model") if by is None else (by,)
    rows, total = [], _empty()
    for key in sorted(groups, key=lambda k: tuple("" if v is None else str(v) for v in k)):
        values = groups[key]
        rows.append(_money({**dict(zip(names, key, strict=True)), **values}))
        for name in _SUMS:
            total[name] += values[name]
    if distinct is not None:
        total["requests"], total["failed"] = distinct
    for values in unsplit.values():
        for name in _SUMS:
            total[name] += values[name]
    return {
        "by": by or "day,model",
        "since": None if since is None else since.isoformat(),
        "until": None if until is None else until.isoformat(),
        "total": _money(total),
        "rows": rows,
    }


def _spend_by_request(session: Session, by: str | None, since: Any, until: Any, groups: Groups) -> None:
    pr = ProviderRequest
    keys: list[KeyColumn]
    if by is None:
        keys = [shares.bucket_expr(session, pr.created_at, "day"), pr.model]
    elif by in ("model", "lane"):
        keys = [getattr(pr, by)]
    else:
        keys = [shares.bucket_expr(session, pr.created_at, by)]
    labelled = [k.label(f"k{i}") for i, k in enumerate(keys)]
    query = (
        sa.select(
            *labelled,
            sa.func.count(),
            sa.func.sum(sa.case((pr.status != "succeeded", 1), else_=0)),
            sa.func.sum(sa.case((pr.status == "succeeded", pr.rows), else_=0)),
            sa.func.sum(sa.func.coalesce(pr.billed_tokens, 0)),
            sa.func.sum(sa.func.coalesce(pr.cost_nano_cny, 0)),
        )
        .where(*in_range(pr.created_at, since, until))
        .group_by(*labelled)
    )
    for row in session.execute(query):
        key = tuple(row[: len(keys)])
        if by == "hour":
            key = (f"{key[0]}:00Z",)
        g = groups[key]
        sums = ("requests", "failed", "rows", "tokens", "cost_nano_cny")
        for name, value in zip(sums, row[len(keys) :], strict=True):
            g[name] += int(value or 0)


def _fold(session: Session) -> None:
    """Fold the roll-ups' pending deltas (PostgreSQL; worker/ledger/rollups.py), so the read adds
    few: they pile up between scrapes of /metrics, which otherwise is the only one to fold them.
    A failure only leaves them to be added by the read."""
    try:
        rollups.fold_apart(session)
    except sa.exc.SQLAlchemyError as exc:
        log.info("roll-up deltas not folded before reading spend (%s)", type(exc).__name__)


def _spend_by_hour(session: Session, by: str | None, since: Any, until: Any, groups: Groups) -> None:
    """The same sums as `_spend_by_request`, from the hourly roll-ups (worker/ledger/rollups.py):
    O(hours × models × lanes × statuses) instead of O(ledger rows in the range)."""
    for bucket, model, lane, status_, n, rows, _est, tokens, cost in rollups.hourly(session, since, until):
        key = {
            None: (bucket[:10], model),
            "hour": (f"{bucket}:00Z",),
            "day": (bucket[:10],),
            "model": (model,),
            "lane": (lane,),
        }[by]
        g = groups[key]
        succeeded = status_ == "succeeded"
        g["requests"] += n
        g["failed"] += 0 if succeeded else n
        g["rows"] += rows if succeeded else 0
        g["tokens"] += tokens
        g["cost_nano_cny"] += cost


def _spend_by_document(session: Session, by: str, since: Any, until: Any, groups: Groups) -> tuple[int, int]:
    """Fill `groups`; returns the distinct (requests, failed): a request that served several
    groups counts in each group but once in the total (split in worker/ledger/shares.py)."""
    per_key, distinct = shares.split(session, by, since, until)
    for key, sums in per_key.items():
        g = groups[(key,)]
        for name in _SUMS[:5]:
            g[name] += sums[name]
    return distinct


def _avoided(session: Session, by: str | None, since: Any, until: Any, groups: Groups) -> None:
    c = HourlyCounter
    keys: list[KeyColumn]
    if by is None:
        keys = [sa.func.substr(c.bucket, 1, 10), c.model]
    elif by == "hour":
        keys = [c.bucket]
    elif by == "day":
        keys = [sa.func.substr(c.bucket, 1, 10)]
    elif by == "lane":
        keys = []
    else:
        keys = [getattr(c, by)]
    where: list[sa.ColumnElement[bool]] = [c.name.like(f"{AVOIDED_PREFIX}%")]
    if since is not None:
        where.append(c.bucket >= hour_bucket(since))
    if until is not None:
        on_the_hour = until.minute == until.second == until.microsecond == 0
        where.append(c.bucket < hour_bucket(until) if on_the_hour else c.bucket <= hour_bucket(until))
    labelled = [k.label(f"k{i}") for i, k in enumerate(keys)]
    query = sa.select(*labelled, c.name, sa.func.sum(c.value)).where(*where).group_by(*labelled, c.name)
    for row in session.execute(query):
        key = tuple(row[: len(keys)])
        if by == "hour":
            key = (f"{key[0]}:00Z",)
        groups[key][row[-2]] += int(row[-1] or 0)


def _money(row: dict[str, Any]) -> dict[str, Any]:
    """Add `cost_cny` as a decimal string (JSON has no decimals; floats are never used)."""
    return {**row, "cost_cny": cny_str(row["cost_nano_cny"])}
