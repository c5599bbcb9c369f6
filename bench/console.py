"""How long each console page and each JSON call behind it takes on a ledger of 100k rows.

For SQLite and PostgreSQL: seeds `--rows` provider requests over the last 30 days (1–3 items each,
over 2,000 documents in 5 collections; 80 % realtime, 10 % batch, 10 % query; 3 % failed), hourly
counters, 50 dead letters and 100 pending documents; starts `sidecar api` as its own process; then
times every call the pages make (`--repeat` times each, over HTTP) and, when Chromium is installed,
every page in headless Chromium from navigation until its data is drawn. Prints a table, then one
JSON line. Target: every page under 1 s.

    python -m bench.console [--rows 100000] [--databases sqlite,postgres] [--repeat 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from bench.common import clean_env, free_port, start_process, stop_process, temp_database, wait_for
from worker.ledger.counters import hour_bucket
from worker.sql import engines, schema
from worker.sql.models import Document, HourlyCounter, ProviderRequest, RequestItem

TOKEN = "bench-console-token"
POSTGRES_URL = os.environ.get(
    "SIDECAR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
COLLECTIONS = ("docs", "faq", "support", "catalog", "wiki")
TARGET_MS = 1000.0


def since_days(days: int) -> str:
    """The `since` the spend page sends for its range (console.js): midnight UTC, `days` calendar
    days back counting today."""
    day = (dt.datetime.now(dt.UTC) - dt.timedelta(days=days - 1)).strftime("%Y-%m-%d")
    return f"{day}T00:00:00Z"


def page_calls() -> dict[str, list[str]]:
    """The JSON calls each page makes (console.js), by page."""
    groups = ("day", "model", "collection", "lane")
    return {
        "overview": ["/v1/status", "/v1/activity?minutes=60"],
        "spend": [f"/v1/spend?by={g}&since={since_days(7)}" for g in groups],  # the default range
        "spend (30 days)": [f"/v1/spend?by={g}&since={since_days(30)}" for g in groups],
        "budgets": ["/v1/budget", "/v1/status"],
        "sources": ["/v1/sources"],
        "deadletters": ["/v1/deadletters?limit=200"],
        "ledger": ["/v1/requests?limit=100"],
        "ledger (filtered)": ["/v1/requests?limit=100&collection=faq&status=failed"],
    }


# --- seeding --------------------------------------------------------------------------------------


def seed(database_url: str, rows: int, rng: random.Random) -> None:
    schema.upgrade(database_url)
    engine = engines.make_engine(database_url)
    now = dt.datetime.now(dt.UTC)
    try:
        with engine.begin() as conn:
            doc_ids = seed_documents(conn, now)
            for start in range(0, rows, 5000):
                requests, items = ledger_chunk(rng, now, start, min(rows, start + 5000), doc_ids)
                insert_rows(conn, ProviderRequest.__table__, requests)
                insert_rows(conn, RequestItem.__table__, items)
            insert_rows(conn, HourlyCounter.__table__, counter_rows(rng, now))
    finally:
        engine.dispose()


def insert_rows(conn: sa.Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    """Bulk insert: COPY on PostgreSQL (a multi-row INSERT of 300k rows takes minutes on a busy
    machine), executemany on SQLite."""
    if conn.dialect.name != "postgresql" or not rows:
        conn.execute(sa.insert(table), rows)
        return
    columns = list(rows[0])
    names = ", ".join(f'"{c}"' for c in columns)
    raw = conn.connection.driver_connection  # psycopg 3
    with raw.cursor() as cursor, cursor.copy(f'COPY "{table.name}" ({names}) FROM STDIN') as copy:
        for row in rows:
            copy.write_row([row[c] for c in columns])


def seed_documents(conn: sa.Connection, now: dt.datetime) -> list[int]:
    docs = []
    for i in range(2000):
        status = "dead" if i < 50 else "pending" if i < 150 else "indexed"
        docs.append(
            {
                "tenant": "default",
                "collection": COLLECTIONS[i % len(COLLECTIONS)],
                "doc_id": f"doc-{i}",
                "version": 1,
                "op": "upsert",
                "text": None,
                "text_hash": "h" * 64,
                "status": status,
                "attempts": 8 if status == "dead" else 0,
                "last_error": "provider rejected the text: 400 data_inspection_failed"
                if status == "dead"
                else None,
                "created_at": now - dt.timedelta(days=30),
                "updated_at": now - dt.timedelta(seconds=i),
            }
        )
    conn.execute(sa.insert(Document), docs)
    return list(conn.execute(sa.select(Document.id)).scalars())


def ledger_chunk(
    rng: random.Random, now: dt.datetime, first: int, end: int, doc_ids: list[int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    span_s = 30 * 86400
    requests: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    for n in range(first, end):
        at = now - dt.timedelta(seconds=span_s * rng.random())
        lane = rng.choices(("realtime", "batch", "query"), (8, 1, 1))[0]
        status = "failed" if rng.random() < 0.03 else "succeeded"
        rid = str(uuid.UUID(int=rng.getrandbits(128)))
        served = [] if lane == "query" else rng.sample(doc_ids, rng.randint(1, 3))
        tokens = 40 * max(1, len(served))
        requests.append(
            {
                "id": rid,
                "provider_request_id": f"req-{n}" if status == "succeeded" else None,
                "status": status,
                "model": "text-embedding-v4" if n % 4 else "text-embedding-v3",
                "dimensions": 1024,
                "api": "compatible",
                "rows": max(1, len(served)),
                "est_tokens": tokens,
                "billed_tokens": tokens if status == "succeeded" else None,
                "cost_nano_cny": tokens * 500 if status == "succeeded" else 0,
                "http_status": 200 if status == "succeeded" else 500,
                "latency_ms": 50.0 + rng.random() * 100,
                "attempt": 1,
                "created_at": at,
                "completed_at": at,
                "lane": lane,
                "collection": COLLECTIONS[n % len(COLLECTIONS)] if lane == "query" else None,
                "tenant": "default" if lane == "query" else None,
            }
        )
        for i, doc in enumerate(served):
            items.append(
                {
                    "request_id": rid,
                    "document_id": doc,
                    "version": 1,
                    "chunk_index": i,
                    "content_hash": "c" * 64,
                    "est_tokens": 40,
                }
            )
    return requests, items


def counter_rows(rng: random.Random, now: dt.datetime) -> list[dict[str, Any]]:
    rows = []
    for hours_ago in range(30 * 24):
        bucket = hour_bucket(now - dt.timedelta(hours=hours_ago))
        rows.append(
            {
                "bucket": bucket,
                "name": "events_accepted",
                "model": "",
                "collection": "",
                "tenant": "",
                "value": rng.randint(50, 500),
            }
        )
        for collection in COLLECTIONS:
            rows.append(
                {
                    "bucket": bucket,
                    "name": "tokens_avoided_dedup",
                    "model": "text-embedding-v4",
                    "collection": collection,
                    "tenant": "default",
                    "value": rng.randint(0, 400),
                }
            )
    return rows


# --- timing ---------------------------------------------------------------------------------------


@contextmanager
def api_process(database_url: str, workdir: Path) -> Iterator[str]:
    port = free_port()
    env = clean_env(
        SIDECAR_DATA_DIR=str(workdir),
        SIDECAR_DATABASE_URL=database_url,
        SIDECAR_API_READ_TOKENS=TOKEN,
        SIDECAR_LOG_LEVEL="WARNING",
    )
    log_path = workdir / "api.log"
    proc = start_process(["-m", "api.cli", "api", "--port", str(port)], env, log_path)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(answers, timeout_s=60, what="sidecar api", procs=[(proc, log_path)])
        yield url
    finally:
        stop_process(proc)


def time_calls(url: str, repeat: int) -> dict[str, dict[str, float]]:
    """Median and max milliseconds of every call the pages make (the first call warms up)."""
    figures: dict[str, dict[str, float]] = {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
        c.get("/console")
        for path in ["/console", *dict.fromkeys(p for paths in page_calls().values() for p in paths)]:
            took = []
            for _ in range(repeat):
                start = time.perf_counter()
                answer = c.get(path)
                took.append((time.perf_counter() - start) * 1000)
                if answer.status_code not in (200, 404):
                    raise RuntimeError(f"{path}: HTTP {answer.status_code} {answer.text[:200]}")
            figures[path] = {"median_ms": round(statistics.median(took), 1), "max_ms": round(max(took), 1)}
    return figures


def time_pages(url: str, repeat: int) -> dict[str, dict[str, float]] | None:
    """Milliseconds from navigation until each page's data is drawn, in headless Chromium."""
    if not os.access(CHROMIUM, os.X_OK):
        return None
    from playwright.sync_api import sync_playwright

    figures: dict[str, dict[str, float]] = {}
    first: list[float] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(f"{url}/console")
        page.fill("#token", TOKEN)
        page.click("#signin-form button")
        page.wait_for_selector("#nav:not([hidden])")
        for view in ("overview", "spend", "budgets", "sources", "deadletters", "ledger", "search"):
            took = []
            for _ in range(repeat):
                start = time.perf_counter()
                page.goto(f"{url}/console#{view}")
                page.reload()
                if view == "spend":  # drawn group by group: the cards come with the first answer
                    page.wait_for_selector("#spend-cards .card", timeout=120_000)
                    first.append((time.perf_counter() - start) * 1000)
                page.wait_for_selector(f'#content[data-view="{view}"]:not([data-loading])', timeout=120_000)
                took.append((time.perf_counter() - start) * 1000)
            figures[view] = {"median_ms": round(statistics.median(took), 1), "max_ms": round(max(took), 1)}
        figures["spend (totals drawn)"] = {
            "median_ms": round(statistics.median(first), 1),
            "max_ms": round(max(first), 1),
        }
        browser.close()
    return figures


def bench_database(kind: str, database_url: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    seed(database_url, args.rows, random.Random(13))
    seeded_s = time.perf_counter() - started
    with api_process(database_url, workdir) as url:
        calls = time_calls(url, args.repeat)
        pages = time_pages(url, args.repeat) if args.browser else None
    by_page = {
        page: round(calls["/console"]["median_ms"] + sum(calls[p]["median_ms"] for p in paths), 1)
        for page, paths in page_calls().items()
    }
    return {"seed_s": round(seeded_s, 1), "calls": calls, "pages_http_ms": by_page, "pages_browser": pages}


def print_table(results: dict[str, dict[str, Any]]) -> None:
    print(f"{'database':<10}{'what':<62}{'median ms':>10}{'max ms':>9}")
    for kind, r in results.items():
        for path, f in r["calls"].items():
            print(f"{kind:<10}{'GET ' + path[:58]:<62}{f['median_ms']:>10.1f}{f['max_ms']:>9.1f}")
        for page, ms in r["pages_http_ms"].items():
            print(f"{kind:<10}{'page ' + page + ' (sum of its calls, sequential)':<62}{ms:>10.1f}{'':>9}")
        for page, f in (r["pages_browser"] or {}).items():
            what = f"page {page} in Chromium (load to drawn)"
            print(f"{kind:<10}{what:<62}{f['median_ms']:>10.1f}{f['max_ms']:>9.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000, help="ledger rows to seed (default 100000)")
    parser.add_argument("--databases", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument(
        "--postgres-url", default=POSTGRES_URL, help="a PostgreSQL server (a temporary database is made)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="timings per call and page (default 5)")
    parser.add_argument("--no-browser", dest="browser", action="store_false", help="time the calls only")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp, ExitStack() as stack:
        for kind in [k.strip() for k in args.databases.split(",") if k.strip()]:
            workdir = Path(tmp) / kind
            workdir.mkdir()
            if kind == "sqlite":
                url = f"sqlite:///{workdir / 'sidecar.sqlite'}"
            elif kind == "postgres":
                url = stack.enter_context(temp_database(args.postgres_url, prefix="bench_console"))
            else:
                print(f"bench.console: unknown database {kind!r}; use sqlite or postgres", file=sys.stderr)
                return 2
            results[kind] = bench_database(kind, url, args, workdir)
    print_table(results)
    slowest = max(
        max([*r["pages_http_ms"].values(), *(f["median_ms"] for f in (r["pages_browser"] or {}).values())])
        for r in results.values()
    )
    print(
        json.dumps(
            {
                "rows": args.rows,
                "results": results,
                "slowest_page_ms": slowest,
                "target_met": slowest < TARGET_MS,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
