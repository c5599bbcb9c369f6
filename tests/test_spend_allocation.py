"""Spend by collection and tenant, split in SQL (worker/ledger/spending.py `_shares`), against the
Python rule `allocate` applied request by request; and spend by day, hour, model and lane from the
hourly roll-ups against the same sums over the ledger rows. On SQLite and PostgreSQL, with the
awkward cases: ties in the remainders, items of zero tokens, failed requests, queries of no item,
a range not on whole hours."""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.ledger import shares, spending
from worker.ledger.spending import allocate, spend
from worker.sql import engines, schema
from worker.sql.models import Document, ProviderRequest, RequestItem

NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)
COLLECTIONS = ("a", "B", "a-b", "a_b", "z9", "docs")


def seed(session: Session, rng: random.Random, requests: int = 400) -> None:
    docs = [
        Document(
            tenant=rng.choice(("t1", "T2", "t-3")),
            collection=rng.choice(COLLECTIONS),
            doc_id=f"d{i}",
            version=1,
            op="upsert",
            status="indexed",
        )
        for i in range(40)
    ]
    session.add_all(docs)
    session.flush()
    for n in range(requests):
        lane = rng.choice(("realtime", "realtime", "batch", "query"))
        served = [] if lane == "query" else rng.sample(docs, rng.randint(1, 5))
        status = rng.choice(("succeeded", "succeeded", "succeeded", "failed", "unknown", "sent"))
        done = status == "succeeded"
        rid = str(uuid.UUID(int=rng.getrandbits(128)))
        session.add(
            ProviderRequest(
                id=rid,
                status=status,
                model=rng.choice(("text-embedding-v4", "text-embedding-v3")),
                dimensions=1024,
                api="compatible",
                rows=rng.randint(1, 7),
                est_tokens=rng.randint(1, 900),
                billed_tokens=rng.randint(0, 997) if done else None,
                cost_nano_cny=rng.choice((rng.randint(0, 10**9), 7, 0, 1)) if done else rng.choice((None, 0)),
                created_at=NOW - dt.timedelta(seconds=rng.randint(0, 5 * 86400)),
                lane=lane,
                collection=rng.choice((*COLLECTIONS, None)) if lane == "query" else None,
                tenant=rng.choice(("t1", None)) if lane == "query" else None,
            )
        )
        for i, doc in enumerate(served):
            session.add(
                RequestItem(
                    request_id=rid,
                    document_id=doc.id,
                    version=1,
                    chunk_index=i,
                    content_hash="c" * 64,
                    est_tokens=rng.choice((0, 0, 3, 40, rng.randint(1, 500))) if n % 7 else 0,
                )
            )
    session.flush()


def reference(session: Session, by: str, since: Any, until: Any) -> dict[Any, dict[str, int]]:
    """The split as it was computed before (one request at a time, in Python)."""
    pr = ProviderRequest
    query = sa.select(pr).where(*spending.in_range(pr.created_at, since, until))
    groups: dict[Any, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in session.execute(query).scalars():
        items = session.execute(
            sa.select(getattr(Document, by), RequestItem.est_tokens)
            .join(Document, Document.id == RequestItem.document_id)
            .where(RequestItem.request_id == r.id)
        ).all()
        parts: dict[Any, int] = {}
        counts: dict[Any, int] = {}
        for key, tokens in items:
            parts[key] = parts.get(key, 0) + tokens
            counts[key] = counts.get(key, 0) + 1
        if not items:
            parts, counts = {getattr(r, by): 0}, {getattr(r, by): 0}
        ok = r.status == "succeeded"
        tokens_ = allocate(r.billed_tokens or 0, parts)
        cost = allocate(r.cost_nano_cny or 0, parts)
        rows = allocate(r.rows if ok else 0, counts)
        for key in parts:
            g = groups[key]
            g["requests"] += 1
            g["failed"] += 0 if ok else 1
            g["rows"] += rows[key]
            g["tokens"] += tokens_[key]
            g["cost_nano_cny"] += cost[key]
    return groups


def by_request(session: Session, since: Any, until: Any) -> dict[str, int]:
    pr = ProviderRequest
    rows = session.execute(sa.select(pr).where(*spending.in_range(pr.created_at, since, until))).scalars()
    sums: dict[str, int] = defaultdict(int)
    for r in rows:
        sums["requests"] += 1
        sums["failed"] += r.status != "succeeded"
        sums["rows"] += r.rows if r.status == "succeeded" else 0
        sums["tokens"] += r.billed_tokens or 0
        sums["cost_nano_cny"] += r.cost_nano_cny or 0
    return sums


RANGES = [
    (None, None),
    (NOW - dt.timedelta(days=2), None),
    (NOW - dt.timedelta(days=3, minutes=17), NOW - dt.timedelta(hours=5, seconds=3)),
]


def check_split(session: Session) -> None:
    for since, until in RANGES:
        everything = by_request(session, since, until)
        for by in ("collection", "tenant"):
            report = spend(session, by=by, since=since, until=until)
            expected = reference(session, by, since, until)
            got = {r[by]: r for r in report["rows"]}
            assert set(got) == set(expected)
            for key, sums in expected.items():
                assert {k: got[key][k] for k in sums} == dict(sums), (by, key)
            total = report["total"]
            assert total["requests"] == everything["requests"]
            assert total["failed"] == everything["failed"]
            for name in ("rows", "tokens", "cost_nano_cny"):  # the shares reconcile
                assert total[name] == everything[name], (by, name)


def test_split_in_sql_is_the_python_rule(database_url):
    """Twice: the second time past hours come from the kept splits, except those changed since."""
    schema.upgrade(database_url)
    engine = engines.make_engine(database_url)
    try:
        with Session(engine) as session, session.begin():
            seed(session, random.Random(13))
            check_split(session)
            check_split(session)
            assert shares.warm(session, days=(dt.datetime.now(dt.UTC) - NOW).days + 7) > 0
            pr = ProviderRequest
            some = session.execute(sa.select(pr).order_by(pr.id).limit(12)).scalars().all()
            for i, r in enumerate(some[:10]):  # changes the stamps must see
                if i % 3 == 0:
                    r.cost_nano_cny = (r.cost_nano_cny or 0) + 1_000_003
                elif i % 3 == 1:
                    r.status, r.billed_tokens = "succeeded", 77
                else:
                    r.rows += 2
            session.flush()
            session.execute(
                sa.delete(RequestItem).where(RequestItem.request_id.in_([r.id for r in some[10:]]))
            )
            session.execute(sa.delete(pr).where(pr.id.in_([r.id for r in some[10:]])))
            session.flush()
            check_split(session)  # many hours changed: split over their whole span
            for r in some[:2]:  # two hours changed: split run by run
                r.cost_nano_cny = (r.cost_nano_cny or 0) + 5
            session.flush()
            check_split(session)
    finally:
        engine.dispose()


def test_roll_ups_give_the_ledger_sums(database_url):
    """A range of whole hours reads the roll-ups; the same rows a microsecond earlier (the seeded
    times are whole seconds) are summed from the ledger: both give the same report."""
    schema.upgrade(database_url)
    engine = engines.make_engine(database_url)
    tick = dt.timedelta(microseconds=1)
    try:
        with Session(engine) as session, session.begin():
            seed(session, random.Random(7), requests=200)
            for since, until in [
                (None, None),
                (NOW - dt.timedelta(days=2), None),
                (NOW - dt.timedelta(days=3), NOW),
            ]:
                everything = by_request(session, since, until)
                for by in (None, "hour", "day", "model", "lane"):
                    hourly = spend(session, by=by, since=since, until=until)
                    scanned = spend(
                        session,
                        by=by,
                        since=None if since is None else since - tick,
                        until=(NOW + dt.timedelta(days=1) if until is None else until) - tick,
                    )
                    assert hourly["rows"] == scanned["rows"], by
                    assert hourly["total"] == scanned["total"], by
                    for name in ("requests", "failed", "rows", "tokens"):
                        assert hourly["total"][name] == everything[name], (by, name)
    finally:
        engine.dispose()


def test_kept_splits_are_bounded_and_stamped():
    kept = type(shares.KEPT)(limit=4)
    one = {"requests": 1, "failed": 0, "rows": 1, "tokens": 2, "cost_nano_cny": 3}
    hours = {f"2026-11-20T0{h}": {"a": one, "b": one} for h in range(4)}
    stamps = {b: f"s{b}" for b in hours}
    kept.put("db", "collection", hours, stamps)
    assert kept.size == 2  # past the limit the oldest hours go, down to 90 % of it
    assert set(kept.get("db", "collection", stamps)) == {"2026-11-20T03"}
    assert kept.get("db", "collection", {"2026-11-20T03": "changed"}) == {}
    assert kept.get("db", "tenant", stamps) == {} and kept.get("other", "collection", stamps) == {}
    assert kept.get("db", "collection", stamps)["2026-11-20T03"]["a"] == one
