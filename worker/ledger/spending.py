"""Spend over time: requests, rows, billed tokens and CNY grouped by hour, day, model, lane,
collection or tenant, with the tokens that dedup and coalescing saved beside them (the CLI and the
API print it). Lanes: `realtime` and `batch` embed documents, `query` embeds searches."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import InstrumentedAttribute, Session

from worker.catalog import cny_str
from worker.ledger.counters import AVOIDED_PREFIX, hour_bucket
from worker.sql.models import Document, HourlyCounter, ProviderRequest, RequestItem

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


def _bucket_expr(session: Session, col: Any, fmt: str) -> sa.ColumnElement[str]:
    """UTC text of a timestamp column: fmt 'hour' → 2026-11-21T07, 'day' → 2026-11-21."""
    if session.get_bind().dialect.name == "postgresql":
        pattern = 'YYYY-MM-DD"T"HH24' if fmt == "hour" else "YYYY-MM-DD"
        return sa.func.to_char(sa.func.timezone("UTC", col), pattern)
    return sa.func.strftime("%Y-%m-%dT%H" if fmt == "hour" else "%Y-%m-%d", col)


def in_range(col: Any, since: dt.datetime | None, until: dt.datetime | None) -> list[sa.ColumnElement[bool]]:
    """`since` ≤ col < `until`, each bound when given."""
    where: list[sa.ColumnElement[bool]] = []
    if since is not None:
        where.append(col >= since)
    if until is not None:
        where.append(col < until)
    return where


def _allocate(total: int, parts: dict[Any, int]) -> dict[Any, int]:
    """Split an integer in proportion to `parts` (largest remainder; ties by key): sums to `total`."""
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
    if by in ("collection", "tenant"):
        distinct = _spend_by_document(session, by, since, until, groups)
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
        keys = [_bucket_expr(session, pr.created_at, "day"), pr.model]
    elif by in ("model", "lane"):
        keys = [getattr(pr, by)]
    else:
        keys = [_bucket_expr(session, pr.created_at, by)]
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


def _spend_by_document(session: Session, by: str, since: Any, until: Any, groups: Groups) -> tuple[int, int]:
    """Fill `groups`; returns the distinct (requests, failed): a request that served several
    groups counts in each group but once in the total."""
    pr = ProviderRequest
    label = sa.func.coalesce(getattr(Document, by), getattr(pr, by)).label("k")
    query = (
        sa.select(
            pr.id,
            pr.status,
            pr.rows,
            pr.billed_tokens,
            pr.cost_nano_cny,
            label,
            sa.func.sum(RequestItem.est_tokens),
            sa.func.count(RequestItem.id),
        )
        .outerjoin(RequestItem, RequestItem.request_id == pr.id)
        .outerjoin(Document, Document.id == RequestItem.document_id)
        .where(*in_range(pr.created_at, since, until))
        .group_by(pr.id, pr.status, pr.rows, pr.billed_tokens, pr.cost_nano_cny, label)
    )
    requests: dict[str, dict[str, Any]] = {}
    for rid, status_, rows, billed, cost, key, tokens, items in session.execute(query):
        r = requests.setdefault(
            rid,
            {
                "status": status_,
                "rows": rows,
                "billed": billed or 0,
                "cost": cost or 0,
                "parts": {},
                "items": {},
            },
        )
        r["parts"][key] = int(tokens or 0)
        r["items"][key] = int(items or 0)
    for r in requests.values():
        succeeded = r["status"] == "succeeded"
        token_shares = _allocate(r["billed"], r["parts"])
        cost_shares = _allocate(r["cost"], r["parts"])
        row_shares = _allocate(r["rows"] if succeeded else 0, r["items"])
        for key in r["parts"]:
            g = groups[(key,)]
            g["requests"] += 1
            g["failed"] += 0 if succeeded else 1
            g["rows"] += row_shares[key]
            g["tokens"] += token_shares[key]
            g["cost_nano_cny"] += cost_shares[key]
    return len(requests), sum(r["status"] != "succeeded" for r in requests.values())


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
