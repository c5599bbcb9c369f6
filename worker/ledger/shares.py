"""Spend split by collection or tenant: each request's billed tokens, cost and rows shared out over
the groups its items belong to, in proportion to their est_tokens (rows: to their number), by the
largest remainder with ties by group name (worker/ledger/spending.py `allocate`, the rule in
Python), so that the groups add up to the request exactly in integer nano-CNY. A query row has no
items and counts whole towards the collection and tenant it names.

The split is computed in SQL (window functions), one query for a range. A range of whole UTC hours
is read hour by hour from splits kept in the process (`KEPT`) instead: each past hour is split once
and kept with a stamp of the hour's roll-up (worker/ledger/rollups.py `hourly`: requests, rows,
tokens and cost by model, lane and status, which the database keeps exact on every change to the
ledger). An hour whose roll-up no longer matches its stamp, or that was never split here, is split
again from the ledger; the current hour, still filling, always is. So a month of spend costs the
roll-up's rows for the month plus the ledger rows of the hours that changed, once the process has
split it the first time. Kept in memory, not in a table: a read writes nothing (on SQLite every
session holds the write lock from its start, worker/sql/engines.py).

What the stamp does not see: a change that leaves every sum of its hour's roll-up as it was (two
rows of the same model, lane and status trading costs), or a change to items or to the
collection a row names without any change to the row itself; the ledger has no such writes
(worker/ledger/calls.py writes a row's items with it, and documents never change collection).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.ledger import rollups
from worker.ledger.counters import hour_bucket
from worker.sql.models import Document, ProviderRequest, RequestItem

SUMS = ("requests", "failed", "rows", "tokens", "cost_nano_cny")
RULE = "largest-remainder-v1"  # in every stamp: a change of rule re-splits every hour
Sums = dict[str, int]


def bucket_expr(session: Session, col: Any, fmt: str) -> sa.ColumnElement[str]:
    """UTC text of a timestamp column: fmt 'hour' → 2026-11-21T07, 'day' → 2026-11-21."""
    if session.get_bind().dialect.name == "postgresql":
        pattern = 'YYYY-MM-DD"T"HH24' if fmt == "hour" else "YYYY-MM-DD"
        return sa.func.to_char(sa.func.timezone("UTC", col), pattern)
    return sa.func.strftime("%Y-%m-%dT%H" if fmt == "hour" else "%Y-%m-%d", col)


def split(
    session: Session, by: str, since: dt.datetime | None, until: dt.datetime | None
) -> tuple[dict[Any, Sums], tuple[int, int]]:
    """Sums per group (`by`: collection or tenant) of the requests created in [since, until), and
    the distinct (requests, failed): a request that served several groups counts in each."""
    if not rollups.whole_hours(since, until):
        return _direct(session, by, since, until)
    hours = rollups.hourly(session, since, until)
    stamps = _stamps(hours)
    distinct = (sum(h[4] for h in hours), sum(h[4] for h in hours if h[3] != "succeeded"))
    where = _where(session)
    kept = KEPT.get(where, by, stamps)
    stale = sorted(b for b in stamps if b not in kept)
    if stale:
        fresh = _split_hours(session, by, stale)
        kept.update(fresh)
        now = hour_bucket(dt.datetime.now(dt.UTC))  # the current hour is still filling: not kept
        KEPT.put(where, by, {b: fresh.get(b, {}) for b in stale if b < now}, stamps)
    groups: dict[Any, Sums] = defaultdict(lambda: dict.fromkeys(SUMS, 0))
    for per_key in kept.values():
        for key, sums in per_key.items():
            g = groups[key]
            for name in SUMS:
                g[name] += sums[name]
    return dict(groups), distinct


def _where(session: Session) -> str:
    """Which database: its URL (no password), and the engine (two in-memory SQLite databases
    share a URL)."""
    engine = session.get_bind().engine
    return f"{engine.url.render_as_string(hide_password=True)}#{id(engine)}"


def _stamps(hours: list[tuple[Any, ...]]) -> dict[str, str]:
    """A fingerprint of each hour's roll-up rows (every hour with requests)."""
    per: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for row in hours:
        per[row[0]].append(row[1:])
    return {
        b: hashlib.sha1(repr((RULE, rows)).encode(), usedforsecurity=False).hexdigest()
        for b, rows in per.items()
    }


class _Kept:
    """Splits of past hours by (database, dimension, hour), with the stamp each was made under;
    shared by the threads of a process. Bounded by group-hours kept (`limit`, ~100 bytes each):
    past it, the oldest hours go first."""

    def __init__(self, limit: int = 500_000) -> None:
        self.limit = limit
        self.size = 0
        self.lock = threading.Lock()
        self.hours: dict[tuple[str, str, str], tuple[str, dict[Any, tuple[int, ...]]]] = {}

    def get(self, where: str, by: str, stamps: dict[str, str]) -> dict[str, dict[Any, Sums]]:
        with self.lock:
            found = {b: self.hours.get((where, by, b)) for b in stamps}
        return {
            b: {key: dict(zip(SUMS, sums, strict=True)) for key, sums in kept[1].items()}
            for b, kept in found.items()
            if kept is not None and kept[0] == stamps[b]
        }

    def put(self, where: str, by: str, splits: dict[str, dict[Any, Sums]], stamps: dict[str, str]) -> None:
        with self.lock:
            for bucket, per_key in splits.items():
                old = self.hours.get((where, by, bucket))
                self.size += len(per_key) - (len(old[1]) if old else 0)
                packed = {key: tuple(sums[n] for n in SUMS) for key, sums in per_key.items()}
                self.hours[(where, by, bucket)] = (stamps[bucket], packed)
            if self.size > self.limit:
                for key in sorted(self.hours, key=lambda k: k[2]):
                    self.size -= len(self.hours.pop(key)[1])
                    if self.size <= self.limit * 0.9:
                        break


KEPT = _Kept()


def _split_hours(session: Session, by: str, buckets: list[str]) -> dict[str, dict[Any, Sums]]:
    """The split of every hour in `buckets` (sorted), from the ledger: one query per run of
    consecutive hours (an old hour that changed does not make the read split every hour since),
    or one over the whole span when the runs are many."""
    hours = [dt.datetime.strptime(b, "%Y-%m-%dT%H").replace(tzinfo=dt.UTC) for b in buckets]
    runs: list[list[dt.datetime]] = []
    for hour in hours:
        if runs and hour - runs[-1][1] == dt.timedelta(hours=1):
            runs[-1][1] = hour
        else:
            runs.append([hour, hour])
    if len(runs) > 8:
        runs = [[hours[0], hours[-1]]]
    wanted = set(buckets)
    out: dict[str, dict[Any, Sums]] = defaultdict(dict)
    for first, last in runs:
        shares = _shares(session, by, first, last + dt.timedelta(hours=1))
        query = sa.select(shares.c.bucket, shares.c.k, *_sums(shares)).group_by(shares.c.bucket, shares.c.k)
        for bucket, key, *sums in session.execute(query):
            if bucket in wanted:
                out[bucket][key] = dict(zip(SUMS, (int(v or 0) for v in sums), strict=True))
    return dict(out)


def _direct(session: Session, by: str, since: Any, until: Any) -> tuple[dict[Any, Sums], tuple[int, int]]:
    """The split of any range, from the ledger in one query."""
    shares = _shares(session, by, since, until)
    first = shares.c.first == 1
    query = sa.select(
        shares.c.k,
        *_sums(shares),
        sa.func.sum(sa.case((first, 1), else_=0)),
        sa.func.sum(sa.case((first, shares.c.failed), else_=0)),
    ).group_by(shares.c.k)
    groups: dict[Any, Sums] = {}
    requests = failed = 0
    for key, *sums, distinct, distinct_failed in session.execute(query):
        groups[key] = dict(zip(SUMS, (int(v or 0) for v in sums), strict=True))
        requests += int(distinct or 0)
        failed += int(distinct_failed or 0)
    return groups, (requests, failed)


def _sums(shares: Any) -> list[Any]:
    return [
        sa.func.count(),
        sa.func.sum(shares.c.failed),
        *(sa.func.sum(_share(shares, name)) for name in ("rows", "tokens", "cost")),
    ]


def _ordered(session: Session, column: Any) -> Any:
    """`column` compared as Python compares str (by code point), as `allocate` breaks ties: the
    "C" collation on PostgreSQL (its default may follow the locale); SQLite compares bytes."""
    return column.collate("C") if session.get_bind().dialect.name == "postgresql" else column


def _shares(session: Session, by: str, since: Any, until: Any) -> Any:
    """Per request and group: the integer part of each share, its remainder, what is left to give
    out, and the share's rank for the leftover units, as `allocate` computes them."""
    pr, big = ProviderRequest, sa.BigInteger
    succeeded = pr.status == "succeeded"
    key = sa.func.coalesce(getattr(Document, by), getattr(pr, by))
    bucket = bucket_expr(session, pr.created_at, "hour")
    where = [pr.created_at >= since] if since is not None else []
    if until is not None:
        where.append(pr.created_at < until)
    per = (
        sa.select(
            pr.id.label("rid"),
            bucket.label("bucket"),
            sa.case((succeeded, 0), else_=1).label("failed"),
            sa.cast(sa.case((succeeded, pr.rows), else_=0), big).label("rows_total"),
            sa.cast(sa.func.coalesce(pr.billed_tokens, 0), big).label("tokens_total"),
            sa.cast(sa.func.coalesce(pr.cost_nano_cny, 0), big).label("cost_total"),
            key.label("k"),
            sa.cast(sa.func.coalesce(sa.func.sum(RequestItem.est_tokens), 0), big).label("tokens_w"),
            sa.cast(sa.func.count(RequestItem.id), big).label("rows_w"),
        )
        .outerjoin(RequestItem, RequestItem.request_id == pr.id)
        .outerjoin(Document, Document.id == RequestItem.document_id)
        .where(*where)
        .group_by(pr.id, pr.created_at, pr.status, pr.rows, pr.billed_tokens, pr.cost_nano_cny, key)
        .subquery()
    )
    whole = sa.select(  # a SUM of BIGINT is NUMERIC on PostgreSQL: cast back, or `//` is not integer
        per,
        sa.cast(sa.func.sum(per.c.tokens_w).over(partition_by=per.c.rid), big).label("tokens_ww"),
        sa.cast(sa.func.sum(per.c.rows_w).over(partition_by=per.c.rid), big).label("rows_ww"),
        sa.func.row_number().over(partition_by=per.c.rid, order_by=_ordered(session, per.c.k)).label("first"),
    ).subquery()
    parts: list[Any] = [whole]
    for name, weight in (("rows", "rows_w"), ("tokens", "tokens_w"), ("cost", "tokens_w")):
        total, w, ww = whole.c[f"{name}_total"], whole.c[weight], whole.c[f"{weight}w"]
        parts.append(
            sa.case((ww > 0, total * w // ww), (whole.c.first == 1, total), else_=0).label(f"{name}_base")
        )
        parts.append(sa.case((ww > 0, total * w % ww), else_=0).label(f"{name}_rem"))
    based = sa.select(*parts).subquery()
    ranked: list[Any] = [based]
    for name in ("rows", "tokens", "cost"):
        rid = based.c.rid
        left = based.c[f"{name}_total"] - sa.func.sum(based.c[f"{name}_base"]).over(partition_by=rid)
        ranked.append(left.label(f"{name}_left"))
        order = [based.c[f"{name}_rem"].desc(), _ordered(session, based.c.k)]
        ranked.append(sa.func.row_number().over(partition_by=rid, order_by=order).label(f"{name}_rank"))
    return sa.select(*ranked).subquery()


def _share(shares: Any, name: str) -> sa.ColumnElement[int]:
    """A group's share: the integer part, plus one unit for the first `left` by remainder."""
    extra = sa.case((shares.c[f"{name}_rank"] <= shares.c[f"{name}_left"], 1), else_=0)
    share: sa.ColumnElement[int] = shares.c[f"{name}_base"] + extra
    return share


def warm(session: Session, days: int = 31) -> int:
    """Split and keep the past `days` (from midnight UTC) by collection and by tenant, so the
    first read of the console's spend page after a start finds them kept; returns the hours kept.
    Meant for a background thread at start-up."""
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(days=days - 1)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    for by in ("collection", "tenant"):
        split(session, by, since, None)
    where = _where(session)
    with KEPT.lock:
        return sum(1 for key in KEPT.hours if key[0] == where and key[2] >= hour_bucket(since))
