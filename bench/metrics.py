"""What a /metrics scrape costs at 1k and at 100k ledger rows, on SQLite and PostgreSQL.

    python -m bench.metrics
    python -m bench.metrics --rows 1000,100000 --scrapes 30 --postgres-url postgresql+psycopg://postgres@127.0.0.1:5432/test

For each database, ledger rows (two models, three lanes, successes with latencies spread over the
histogram, 429s, timeouts of unknown outcome), all created today, are inserted in bulk through the
ledger's table (so the roll-up triggers fire for each, as in production). Then, p50 / p95 in ms of:

    (first_fold_ms    PostgreSQL: folding the load's deltas into the roll-ups, which the first
                      scrape after it does; in the JSON line)
    scrape            `api.metrics.render` without spend caps
    scrape_daily_cap  the same with a daily cap: the budget gauges sum the cap window's spend
                      from the ledger (worker/ledger/spent.py), here every row of today
    ledger_scan       what the scrape ran before the roll-ups: a GROUP BY over `provider_requests`
                      for the totals, one for the latency histogram
    day_spend_ledger  today's spend as the budget computes it now (worker/ledger/spent.py)
    day_spend_rollup  the same figure from the hourly roll-up (worker/ledger/rollups.py)

Last, on PostgreSQL, what the roll-ups cost the writers: provider requests per second the
ledger takes from `--writers` threads (intent row, then success), with the triggers and without.
The last line is one JSON object. `--postgres-url ''` skips PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from api import metrics
from bench.common import percentile, temp_database
from worker.embedding.base import EmbedResult
from worker.ledger import budget, calls, rollups, spent
from worker.settings import Settings
from worker.sql import engines, schema
from worker.sql.models import ProviderRequest, utcnow
from worker.sql.rollup_models import RequestTotal

MODELS = ("text-embedding-v4", "text-embedding-v3")
LANES = ("realtime", "realtime", "realtime", "query", "batch")


def ledger_rows(start: int, n: int, rng: random.Random) -> list[dict[str, Any]]:
    now = utcnow()
    out = []
    for i in range(start, start + n):
        roll = rng.random()
        status, http, latency = "succeeded", 200, rng.lognormvariate(5.0, 1.0)  # ~150 ms median
        if roll < 0.02:
            status, http, latency = "failed", 429, rng.uniform(1, 20)
        elif roll < 0.03:
            status, http, latency = "unknown", None, None
        est = rng.randint(50, 5000)
        out.append(
            {
                "id": str(uuid.UUID(int=i + 1)),
                "status": status,
                "model": MODELS[i % 2],
                "dimensions": 1024,
                "api": "compatible",
                "rows": 10,
                "est_tokens": est,
                "billed_tokens": est if status != "failed" else 0,
                "cost_nano_cny": est * 500 if status != "failed" else 0,
                "http_status": http,
                "latency_ms": latency,
                "attempt": 1,
                "created_at": now,
                "completed_at": now,
                "lane": LANES[i % len(LANES)],
            }
        )
    return out


def seed(sessions: Any, start: int, n: int, rng: random.Random) -> float:
    began = time.perf_counter()
    for offset in range(0, n, 5000):
        with sessions.begin() as s:
            s.execute(sa.insert(ProviderRequest), ledger_rows(start + offset, min(5000, n - offset), rng))
    return time.perf_counter() - began


def ledger_scan(session: Any) -> None:
    """What every scrape ran before the roll-ups: two GROUP BYs over the whole ledger."""
    pr = ProviderRequest
    session.execute(
        sa.select(
            pr.model,
            pr.status,
            sa.func.count(),
            sa.func.sum(sa.case((pr.status == "succeeded", pr.rows), else_=0)),
            sa.func.sum(sa.func.coalesce(pr.billed_tokens, 0)),
            sa.func.sum(sa.func.coalesce(pr.cost_nano_cny, 0)),
            sa.func.sum(sa.case((pr.http_status == 429, 1), else_=0)),
        ).group_by(pr.model, pr.status)
    ).all()
    buckets = [
        sa.func.sum(sa.case((pr.latency_ms <= b * 1000, 1), else_=0)) for b in metrics.LATENCY_BUCKETS_S
    ]
    session.execute(
        sa.select(pr.model, sa.func.count(), sa.func.sum(pr.latency_ms), *buckets)
        .where(pr.latency_ms.is_not(None))
        .group_by(pr.model)
    ).all()


def timed(sessions: Any, work: Callable[[Any], object], times: int) -> dict[str, float]:
    samples = []
    for _ in range(times):
        began = time.perf_counter()
        with sessions.begin() as s:
            work(s)
        samples.append((time.perf_counter() - began) * 1000)
    return {
        "p50_ms": round(statistics.median(samples), 2),
        "p95_ms": round(percentile(samples, 95) or 0, 2),
    }


def bench_database(
    name: str, url: str, sizes: list[int], scrapes: int, data_dir: Path
) -> list[dict[str, Any]]:
    schema.upgrade(url)
    engine = engines.make_engine(url)
    sessions = engines.make_sessionmaker(engine)
    settings = Settings(data_dir=data_dir, database_url=url)
    capped = Settings(data_dir=data_dir, database_url=url, budget_daily_cny="100")
    rng, have, out = random.Random(7), 0, []
    today = budget.window("day", utcnow())
    try:
        for size in sizes:
            seed_s = seed(sessions, have, size - have, rng)
            have = size
            if name == "postgresql":
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.execute(sa.text("ANALYZE"))
            with sessions() as s:  # what the first scrape after the load does (PostgreSQL)
                began = time.perf_counter()
                rollups.fold_apart(s)
                fold_ms = (time.perf_counter() - began) * 1000
                rollup_rows = s.execute(sa.select(sa.func.count()).select_from(RequestTotal)).scalar_one()
            out.append(
                {
                    "database": name,
                    "ledger_rows": size,
                    "rollup_rows": int(rollup_rows),
                    "seed_s": round(seed_s, 2),
                    "first_fold_ms": round(fold_ms, 1),
                    "scrape": timed(sessions, lambda s: metrics.render(s, settings), scrapes),
                    "scrape_daily_cap": timed(sessions, lambda s: metrics.render(s, capped), scrapes),
                    "ledger_scan": timed(sessions, ledger_scan, scrapes),
                    "day_spend_ledger": timed(sessions, lambda s: spent.spent_overall(s, *today), scrapes),
                    "day_spend_rollup": timed(sessions, lambda s: rollups.spent_overall(s, *today), scrapes),
                }
            )
    finally:
        engine.dispose()
    return out


def ledger_writes_per_s(url: str, *, threads: int, requests: int, triggers: bool) -> float:
    """Provider requests per second the ledger takes from `threads` writers (each request: its
    intent row, then its success, two transactions), with the roll-up triggers or without."""
    schema.upgrade(url)
    engine = engines.make_engine(url, pool_size=threads)
    sessions = engines.make_sessionmaker(engine)
    if not triggers:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER provider_request_totals_sync ON provider_requests"))

    def writer() -> None:
        for _ in range(requests):
            request_id = str(uuid.uuid4())
            with sessions.begin() as s:
                calls.open_request(
                    s, request_id=request_id, model=MODELS[0], dimensions=1024, api="compatible", rows=10,
                    est_tokens=100, items=[], attempt=1, key_fingerprint=None, worker="bench",
                )  # fmt: skip
            result = EmbedResult(vectors=[], billed_tokens=99, request_id=request_id, latency_ms=80.0)
            with sessions.begin() as s:
                calls.record_success(s, request_id, result, 99 * 500)

    began = time.perf_counter()
    workers = [threading.Thread(target=writer) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - began
    engine.dispose()
    return round(threads * requests / elapsed, 1)


def render(results: list[dict[str, Any]]) -> str:
    columns = ("scrape", "scrape_daily_cap", "ledger_scan", "day_spend_ledger", "day_spend_rollup")
    head = f"{'database':<11} {'ledger rows':>11} {'roll-up rows':>12}"
    head += "".join(f" {c:>27}" for c in columns)
    lines = [head, "-" * len(head)]
    for r in results:
        line = f"{r['database']:<11} {r['ledger_rows']:>11,} {r['rollup_rows']:>12,}"
        for c in columns:
            line += f" {r[c]['p50_ms']:>17.2f} / {r[c]['p95_ms']:<7.2f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1000,100000", help="ledger sizes to measure, ascending")
    parser.add_argument("--scrapes", type=int, default=30, help="scrapes timed at each size")
    parser.add_argument(
        "--postgres-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="a PostgreSQL server (a temporary database is made on it); '' skips PostgreSQL",
    )
    parser.add_argument(
        "--writers",
        type=int,
        default=8,
        help="PostgreSQL: threads writing the ledger, with and without the roll-up triggers; 0 skips",
    )
    args = parser.parse_args(argv)
    sizes = sorted(int(n) for n in args.rows.split(","))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results += bench_database("sqlite", f"sqlite:///{tmp}/ledger.sqlite", sizes, args.scrapes, Path(tmp))
        if args.postgres_url:
            with temp_database(args.postgres_url, "bench_metrics") as url:
                results += bench_database("postgresql", url, sizes, args.scrapes, Path(tmp))
    writes = {}
    if args.postgres_url and args.writers:
        for triggers in (False, True, False, True):  # twice each, interleaved: the machine drifts
            with temp_database(args.postgres_url, "bench_writes") as url:
                rate = ledger_writes_per_s(url, threads=args.writers, requests=150, triggers=triggers)
            writes.setdefault("with_rollups" if triggers else "without_rollups", []).append(rate)
    print(render(results))
    for name, rates in writes.items():
        print(f"PostgreSQL ledger writes, {args.writers} threads, {name}: {rates} requests/s")
    print(json.dumps({"bench": "metrics", "results": results, "ledger_writes_per_s": writes}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
